"""Layer 2, the algorithms: small pure functions on tensors with explicit state (NUTS, HMC,
step-size and mass adaptation, random-walk MH, SG-MCMC update rules and schedules)."""
