"""The fake FreeSWITCH lives in the package (the demo uses it too); the tests replay every
capture in tests/captures/ with it."""

from fs_cc360.simulators import freeswitch as _sim
from fs_cc360.simulators.freeswitch import *  # noqa: F403
from fs_cc360.simulators.freeswitch import (  # noqa: F401
    CORE_UUID,
    DISCONNECT_BODY,
    REJECTION_BODY,
    event_body,
    event_name,
    hostile_stream,
    mutated_frames,
    url_encode,
)
from tests.fakes.captures import capture_frames


class FakeFreeSwitch(_sim.FakeFreeSwitch):
    load_frames = staticmethod(capture_frames)
