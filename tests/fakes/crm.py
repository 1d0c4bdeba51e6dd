"""The fake CC360 server lives in the package (the demo uses it too)."""

from fs_cc360.simulators.crm import *  # noqa: F403
from fs_cc360.simulators.crm import FakeCrm, Received  # noqa: F401
