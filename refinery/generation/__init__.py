"""Text generation: the engine interface with continuous batching and its backends (OpenVINO,
transformers, static batches), generators over registered variants, answer scoring."""
