"""pdenet: convolutional networks written as discretized PDEs, built on lean convolution operators."""
__version__ = "0.1.0"
