"""fs-cc360: connects FreeSWITCH (event socket) to the CC360 CRM."""

__version__ = "0.1.0"
