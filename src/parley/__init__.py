"""parley: a self-hostable real-time voice agent server speaking the ACS media-streaming protocol."""

__version__ = "0.1.0"
