"""Fine-tuning and quantization as plain functions: base model, SFT data, LoRA, merge,
quantized variants, registration. Never imports dagster."""
