"""Layer 4, what every backend returns: the Posterior, its predictive and approximations,
and the one place that builds ArviZ objects (``arviz_io``)."""

from pbnn.posterior.posterior import Posterior
from pbnn.posterior.predictive import Prediction

__all__ = ["Posterior", "Prediction"]
