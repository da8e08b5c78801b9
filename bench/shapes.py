"""The GPT-NeoX shapes the benchmarks take by name (the Pythia family; 2.8b = dolly-v2-3b), shared by the scripts."""

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10240),
}
LLMCXR_VOCAB = 51305  # dolly-v2-3b's 50280 ids + RESPONSE_NL + 1024 image codes
TRAIN_VOCAB = {"tiny": 512, "pythia-70m": 50304, "410m": 50304, "2.8b": LLMCXR_VOCAB}  # each model's own
