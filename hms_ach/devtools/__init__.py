"""Development helpers shared by scripts/, tests/ and benchmarks/; the engine itself never imports them."""
