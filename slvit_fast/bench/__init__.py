"""Benchmarks behind ``slvit-fast bench``: interleaved timing of our backends vs eager and torch.compile."""
