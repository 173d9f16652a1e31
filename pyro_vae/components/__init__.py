"""The parts a model is built from, each chosen by a spec string: priors p(z), likelihoods
p(x|z), guides q(z|x), encoder/decoder networks, and the distributions they return."""
