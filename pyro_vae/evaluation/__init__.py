"""Held-out numbers (test ELBO, importance-sampled log p(x)), the estimator comparison, and
the pictures."""
