"""knetlab: train, sweep, evaluate and compare K-Net segmentation models on Ray, tracked in MLflow."""

__version__ = "0.1.0"
