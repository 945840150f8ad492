"""adabatch-hvd: AdaBatch adaptive batch sizes on Horovod."""

__version__ = "0.1.0"
