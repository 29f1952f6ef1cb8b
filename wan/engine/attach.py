"""One way to attach a job to loaded networks, and to take it off again.

The networks outlive the job: a model stays loaded between requests, so whatever one job sets on
its DiTs (the attention kernel, RIFLEx, a block runner for the step savers, LoRAs, and, coming,
trainable layers and parallel attention) must be gone when the job ends, however it ends::

    parts = [AttentionKernel(profile_order, device), SetOnNetworks("riflex", (6, 21)),
             SetOnNetworks("block_runner", runner), loras]
    with attach_job(nets.dits, parts) as notices:
        ...                                   # the denoising loop

Each part is an :class:`Attachment`: ``attach(networks)`` returns notices (in words, for the job's
result) and ``detach(networks)`` restores what it changed. Parts attach in order and detach in
reverse order, on a normal exit, on an exception and on cancel (the loop's ``Cancelled``). A part
whose own ``attach`` fails must leave nothing behind; the parts attached before it are detached.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Protocol, Sequence

_UNSET = object()


class Attachment(Protocol):
    """Something a job sets on its networks and restores afterwards."""

    def attach(self, networks: Mapping[str, Any]) -> list[str]:
        """Sets this part on every network (expert name -> DiT); returns notices, possibly none."""

    def detach(self, networks: Mapping[str, Any]) -> None:
        """Restores what :meth:`attach` changed."""


@contextmanager
def attach_job(networks: Mapping[str, Any], parts: Sequence[Attachment | None]) -> Iterator[list[str]]:
    """Attaches ``parts`` (``None`` entries are skipped) for the ``with`` block; yields their
    notices, each said once even when several experts report it."""
    attached: list[Attachment] = []
    notices: list[str] = []
    try:
        for part in parts:
            if part is None:
                continue
            for line in part.attach(networks) or ():
                if line not in notices:
                    notices.append(line)
            attached.append(part)
        yield notices
    finally:
        for part in reversed(attached):
            part.detach(networks)


class SetOnNetworks:
    """Sets one attribute of every network (``riflex``, ``block_runner``) and restores each
    network's previous value on detach."""

    def __init__(self, name: str, value: Any):
        self.name, self.value = name, value
        self._previous: dict[str, Any] = {}

    def attach(self, networks: Mapping[str, Any]) -> list[str]:
        for key, net in networks.items():
            self._previous[key] = getattr(net, self.name, _UNSET)
            setattr(net, self.name, self.value)
        return []

    def detach(self, networks: Mapping[str, Any]) -> None:
        for key, previous in self._previous.items():
            net = networks[key]
            if previous is _UNSET:
                delattr(net, self.name)
            else:
                setattr(net, self.name, previous)
        self._previous.clear()


class AttentionKernel:
    """The job's attention backend (a profile's order of preference, see
    :func:`wan.optim.attention.apply_attention`) on every network, each expert selecting for its
    own device and dtype; a fallback notice of any expert is kept."""

    def __init__(self, preference: Sequence[str] | str, device=None):
        self.preference, self.device = preference, device
        self._previous: dict[str, Any] = {}

    def attach(self, networks: Mapping[str, Any]) -> list[str]:
        from wan.optim.attention import apply_attention
        notices: list[str] = []
        for key, net in networks.items():
            self._previous[key] = net.attention
            notices += apply_attention(net, self.preference, device=self.device).notices
        return notices

    def detach(self, networks: Mapping[str, Any]) -> None:
        for key, previous in self._previous.items():
            networks[key].attention = previous
        self._previous.clear()
