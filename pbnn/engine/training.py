"""Transitional alias of :mod:`pbnn.engine.optim` for the modules that still import the old
names (the MCMC and SG-MCMC engines, Laplace, the metrics, the backend base). Delete it
once they import :mod:`pbnn.engine.optim` and use :func:`~pbnn.engine.optim.fit_map`."""

from pbnn.engine.optim import FULL_BATCH_LIMIT, batch_indices, decay, fit_map, optimise, resolve_batch_size, seeded

__all__ = ["FULL_BATCH_LIMIT", "batch_indices", "fit_map", "resolve_batch_size", "run_adam", "seeded"]


def run_adam(params, loss_fn, *, num_steps, lr, n, batch_size, per_point=True, **options) -> list[float]:
    """The former Adam loop (lr decaying 10x, clip norm 10): :func:`pbnn.engine.optim.optimise`."""
    return optimise(
        params, loss_fn, num_steps=num_steps, lr=decay(lr, num_steps), n=n, batch_size=batch_size,
        scale=n if per_point else 1, **options,
    )
