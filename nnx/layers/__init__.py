"""All layers. Each file holds one family; each layer's ``backward`` sits right under its ``forward``."""
from .base import Layer, Parameter
from .dense import Dense
from .activations import ACTIVATIONS, LeakyReLU, ReLU, Sigmoid, Tanh
from .dropout import Dropout
from .shape import Flatten, Reshape
from .softmax import Softmax, log_softmax, softmax
from .conv import Conv2D
from .pool import AvgPool2D, GlobalAvgPool, MaxPool2D
from .batchnorm import BatchNorm
from .chain import Chain
from .residual import Residual

__all__ = ["Layer", "Parameter", "Dense", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Dropout",
           "Flatten", "Reshape", "Softmax", "softmax", "log_softmax", "ACTIVATIONS",
           "Conv2D", "MaxPool2D", "AvgPool2D", "GlobalAvgPool", "BatchNorm", "Chain", "Residual"]
