"""Checkpoint I/O shared by convert, finetune and validate: safetensors directories and GGUF files read one
tensor at a time, the streaming shard writer, atomic output directories."""
