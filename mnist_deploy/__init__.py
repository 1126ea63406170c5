"""mnist-deploy: train an MNIST classifier, export it with parity checks, benchmark and serve it."""

__version__ = "0.1.0"
__all__ = ["__version__"]
