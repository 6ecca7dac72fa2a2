"""``pyvl serve``: load the model, build the app, run uvicorn until SIGINT/SIGTERM.

On a signal the app first ends every live stream with an error event and refuses new requests (503), then
uvicorn stops accepting, waits up to ``GRACE_S`` for open connections, and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import ServeSettings, create_app
from .malloc import pin_allocator_thresholds

__all__ = ["serve"]

GRACE_S = 3.0


class _HalfCloseH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, except that a client that half-closes its connection after a complete
    request still gets the answer (asyncio closes the transport at EOF unless ``eof_received`` returns True)."""

    def eof_received(self) -> bool | None:
        return True if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE) else None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.loop is not None and not self.state.shutting_down:
            self.loop.call_soon_threadsafe(self.state.begin_shutdown)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a handled signal is a clean exit, not one to re-raise afterwards


def serve(model, settings: ServeSettings, host: str, port: int, log_level: str = "info") -> None:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not pin_allocator_thresholds():
        logging.getLogger("pyvl.serve").warning(
            "not glibc: big requests may leave freed memory with the process"
        )
    model.engine.cache.commit()  # the memory a server holds is known at its start, not reached under traffic
    app = create_app(model, settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
        lifespan="off",
        http=_HalfCloseH11,
    )
    logging.getLogger("pyvl.serve").info(
        "serving %s on http://%s:%d/v1", settings.served_model_name, host, port
    )
    _Server(config, app.state.serve).run()
