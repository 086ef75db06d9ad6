"""Test doubles for metrix-s2s: stand-ins for the services it talks to, never used in production.

:class:`FakeMetrix` is a real HTTP server speaking Metrix's S2S in-app event API
(:mod:`metrix_s2s.testing.fake_metrix`); tests, ``metrix-s2s demo`` and docker-compose's local try
deliver events to it instead of the internet.
"""

from .fake_metrix import FakeMetrix, Received, load_apps_json, run_command_line, server_objection

__all__ = ["FakeMetrix", "Received", "load_apps_json", "run_command_line", "server_objection"]
