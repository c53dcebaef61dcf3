"""
nanoplay's trainer: `nanoplay train` (pre-training from presets) and `nanoplay finetune` (chat).

config.py   presets and TOML configs, every key also a flag
data.py     text sources through `datasets`, tokenised once into cached uint16 shards
chat_data.py conversations: validation, chat template, loss masks
loop.py     the training loop (bf16/compile on CUDA, DDP under torchrun, exact resume, Ctrl+C saves)
checkpoints.py  step checkpoints in the engine's format with the training state beside them
monitor.py  the live terminal view, metrics.jsonl, TensorBoard
train.py / finetune.py  the two commands (train() is the Python API)
"""
