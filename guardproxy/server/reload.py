"""Hot reload of the policy: on SIGHUP, or when the configuration file changes on disk.

Only what a request reads when it starts is swapped (policies, their routes, the proxy's API keys);
requests in flight keep the policy they started with, since each holds its own reference. A file that
fails to load is rejected whole: the error is logged and the policy in force stays. Changes to the
server, upstream, guard, logging or audit sections need a restart, and the log says so."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import replace
from pathlib import Path

from guardproxy.config import ConfigError, Settings, load_settings_file

log = logging.getLogger(__name__)

_RESTART_SECTIONS = ("server", "upstream", "guard", "logging", "audit")


class SettingsStore:
    """The settings requests read now. Swapped whole, never mutated."""

    def __init__(self, settings: Settings) -> None:
        self.current = settings
        self.reloads = 0


class ConfigReloader:
    def __init__(self, path: str | Path, store: SettingsStore, interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.store = store
        self.interval_s = interval_s
        self._stamp = self._read_stamp()
        self.rejected = 0

    def _read_stamp(self) -> tuple[int, int, int] | None:
        # stat() follows symlinks: a Kubernetes ConfigMap update swaps the `..data` link to a new
        # directory, so the file seen through the link is another inode (kept in the stamp even when
        # its time and size happen to match).
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self) -> bool:
        """Load the file now; True when the new policy is in force."""
        self._stamp = self._read_stamp()
        try:
            # A file caught empty (truncated mid-write by an editor) would load as all defaults and
            # quietly replace the policy in force: refuse it like any invalid file.
            if not self.path.read_text(encoding="utf-8").strip():
                raise ConfigError(f"{self.path}: the file is empty")
            new = load_settings_file(self.path)
        except OSError as exc:
            log.error("configuration reload failed, the policy in force is kept: %s", exc)
            self.rejected += 1
            return False
        except ConfigError as exc:
            log.error("configuration reload rejected, the policy in force is kept: %s", exc)
            self.rejected += 1
            return False
        old = self.store.current
        stale = [name for name in _RESTART_SECTIONS if getattr(new, name) != getattr(old, name)]
        if stale:
            log.warning("configuration sections %s changed: they take effect on restart", ", ".join(stale))
        self.store.current = replace(
            old, policy=new.policy, policies=new.policies, routes=new.routes, auth=new.auth
        )
        self.store.reloads += 1
        log.info("policy reloaded from %s (reload %d)", self.path, self.store.reloads)
        return True

    async def watch(self) -> None:
        """Poll the file's modification time and size; bounded by the app's lifetime."""
        if self.interval_s <= 0:
            return  # SIGHUP only
        while True:
            await asyncio.sleep(self.interval_s)
            stamp = self._read_stamp()
            if stamp is None or stamp == self._stamp:
                continue
            # Let a write finish: load only once the file has stopped changing.
            await asyncio.sleep(min(0.2, self.interval_s))
            if self._read_stamp() == stamp:
                self.reload()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> bool:
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (RuntimeError, NotImplementedError, ValueError):
            return False  # not the main thread (tests), or no signals here: the file watch still works
        return True
