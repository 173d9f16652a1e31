"""How the model is fitted: ELBO estimators by name, the optimizer SVI steps with, and the
checks that stop a diverging run."""
