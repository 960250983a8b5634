"""knetlab.platform."""
