"""Owner: the one lifetime protocol of every ascend object that owns a resource.

An owner holds something that must be given back exactly once: device
memory, tensor descriptors, an operator executor, the AscendCL runtime.
Subclasses implement a single hook, :meth:`Owner._release`; the base class
provides the rest:

* :meth:`~Owner.close` releases at most once (idempotent, thread-safe: the
  first caller releases, the others return at once);
* :attr:`~Owner.closed` tells whether that happened;
* ``with owner:`` closes on leaving the block, also on an exception;
* garbage collection closes an owner nobody closed, as a safety net;
  ``__del__`` never raises and does nothing at interpreter shutdown, when
  module globals may already be None and the runtime's ``atexit`` teardown
  has given everything back;
* :meth:`~Owner._check_open` raises ``ValueError`` (or the subclass's
  ``_closed_error``) naming the object for any use after :meth:`~Owner.close`.

Examples
--------
>>> from ascend._owner import Owner
>>> class Handle(Owner):
...     def __init__(self, log):
...         self.log = log
...         Owner.__init__(self)       # open once the resource is held
...     def _release(self):
...         self.log.append("released")
...     def use(self):
...         self._check_open()
...         return "used"
...     def __repr__(self):
...         return "Handle()"
>>> log = []
>>> with Handle(log) as h:
...     h.use()
'used'
>>> h.closed, log
(True, ['released'])
>>> h.close(); log                    # idempotent: released exactly once
['released']
>>> h.use()
Traceback (most recent call last):
    ...
ValueError: Handle() is closed
"""

import sys

__all__ = ["Owner"]


class Owner:
    """Base class of objects that own a device or host resource; see the module docs.

    Subclasses set up their state, then call ``Owner.__init__(self)`` to mark
    the object open, and implement :meth:`_release`. An object whose
    ``__init__`` failed before that point counts as closed and releases nothing.
    """

    # ``_open`` holds one token while open. ``list.pop`` is atomic, so of several
    # threads closing at once exactly one gets the token and releases, without a lock.
    __slots__ = ("_open",)

    #: exception type raised on use after close (subclasses may keep an older type)
    _closed_error = ValueError

    def __init__(self):
        self._open = [True]

    def _release(self):
        """Give the resource back. Called exactly once, by the first :meth:`close`."""
        raise NotImplementedError

    @property
    def closed(self):
        """True once :meth:`close` ran (subclasses may add other reasons)."""
        return not getattr(self, "_open", None)

    def close(self):
        """Release the resource; idempotent. Errors of the release propagate (once:
        the object counts as closed all the same)."""
        try:
            self._open.pop()
        except (IndexError, AttributeError):  # already closed, or never opened
            return
        self._release()

    def _closed_message(self):
        return f"{self!r} is closed"

    def _check_open(self):
        """Raise ``_closed_error`` if this object is :attr:`closed`."""
        if self.closed:
            raise self._closed_error(self._closed_message())

    def __enter__(self):
        if self.closed:
            self._check_open()  # raises
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self, _finalizing=sys.is_finalizing):
        # bound at definition: at shutdown the module global ``sys`` may be None
        try:
            if not getattr(self, "_open", None) or _finalizing():
                return
            self.close()
        except Exception:  # a finaliser must not raise; the runtime's atexit cleans up
            pass
