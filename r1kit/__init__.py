"""r1kit: the DeepSeek-R1 recipe on your own hardware and your own verifiable tasks."""

__version__ = "0.1.0"
