"""Layer 1, the model: networks with priors (``model``, ``priors``, ``likelihoods``), their
log joint as a pure function (``potential``), validated data (``data``) and demo data sets."""
