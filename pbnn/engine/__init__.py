"""Layer 3, the drivers: the optimiser loop, the chain runner, seeding and ``torch.distributed``."""
