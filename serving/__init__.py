"""The HTTP side only: the BentoML services (OpenAI-compatible routes, RAG, images), cache,
limits, accounting, metrics, the traffic log, and building and deploying the Bento. The domain
lives in ``refinery``; nothing outside this package imports it except the Bento's own asset and
command."""
