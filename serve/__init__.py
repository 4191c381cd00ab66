"""gptcpu's HTTP server: the OpenAI API over a continuously batched engine (`gptcpu serve`)."""

from __future__ import annotations


def create_app(*args, **kwargs):
    """A FastAPI app serving a loaded Model (see gptcpu.serve.app.create_app)."""
    from .app import create_app
    return create_app(*args, **kwargs)


def serve(model, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "info", **app_options) -> None:
    """Run the server until SIGTERM or Ctrl-C. On SIGTERM it stops accepting connections, lets
    running requests finish for up to shutdown_timeout seconds (then ends them, finish_reason
    "length", streams closed with [DONE]) and returns normally."""
    import signal

    import uvicorn

    app = create_app(model, **app_options)
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            scheduler.drain(shutdown_timeout)
            if sig == signal.SIGTERM:  # a clean stop: exit 0 rather than re-raise the signal
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout + 5)
    Server(config).run()
