"""Running the guard in the foreground (the CLI's ``guard`` verb).

``serve_forever(config)`` opens the store named by ``config.db_url``, loads the fitted
detector named by ``config.detector_dir`` (``load_detector``; none when empty) and runs
uvicorn until interrupted. Tests, benchmarks and the demo run the app on a background thread
with :func:`stillhouse.http.server.start_in_thread`.
"""

from __future__ import annotations

from typing import Any

from stillhouse.guard.config import GuardConfig
from stillhouse.guard.detect.load import load_detector


def serve_forever(config: GuardConfig, detector: Any = None) -> None:
    """Open the store and run the guard under uvicorn until interrupted (the CLI's `guard` verb).

    ``detector``: an already loaded detector (or a ProcessDetector); otherwise the one in
    ``config.detector_dir``, if set, in its own process unless ``config.detect_mode`` is "inline"."""
    import uvicorn

    from stillhouse.guard.app import create_app
    from stillhouse.guard.store import open_store

    if detector is None and config.detector_dir:
        if config.detect_mode == "process":
            from stillhouse.guard.detect.remote import ProcessDetector

            load_detector(config.detector_dir)  # a bad directory fails here, not in the child
            detector = ProcessDetector(config.detector_dir)
        else:
            detector = load_detector(config.detector_dir)
    if detector is not None and config.detector_dir and not hasattr(detector, "submit"):
        from stillhouse.guard.detect.remote import warm_up

        warm_up(config.detector_dir)  # inline: the first observe's imports happen now, not on a request
    store = open_store(config.db_url)
    app = create_app(config, store, detector=detector)
    # proxy_headers=False: the guard alone decides whether X-Forwarded-For is trusted
    # (GuardConfig.trust_forwarded_for); uvicorn's default would take it from any loopback client.
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", access_log=False,
                lifespan="on", backlog=4096, timeout_graceful_shutdown=10, proxy_headers=False)
