"""``python -m shadowvmm_vhost_user.refbackend SOCKET``: run the reference back-end."""

from __future__ import annotations

from .server import main

raise SystemExit(main())
