"""Inference: decoding with the KV cache (`infer.generate`: greedy, sampling, beam search; MiLoRA routes
once per prompt) and evaluation on data sets (`infer.evaluate`: exact match, multiple choice, perplexity)."""
