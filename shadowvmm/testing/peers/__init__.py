"""Launchers for the real vhost-user peers used by the tests.

Three backends come from Debian bookworm packages (see
``scripts/install-peers.sh``), one from this project:

* :class:`QsdBlk` - ``qemu-storage-daemon`` exporting vhost-user-blk, optionally
  with a QMP monitor (:meth:`QsdBlk.qmp`);
* :class:`Virtiofsd` - the C ``virtiofsd`` of QEMU 7.2 (one session per process);
* :class:`DpdkTestpmd` - ``dpdk-testpmd`` with the ``net_vhost`` PMD, no hugepages;
* :class:`RefBlk` - the Python reference vhost-user-blk back-end
  (:mod:`shadowvmm_vhost_user.refbackend`) in its own process;
* :class:`Daemon` - any user's back-end daemon, from its command line.

Every launcher owns exactly one child process, writes its log into the work
directory, and is a context manager (``with QsdBlk(...) as qsd: ...``).
``stop()`` always reaps the child, so no zombie or stray process is left;
``kill()`` models a crash (``kill -9``) and ``restart()`` brings the same peer
back on the same socket and image.
"""

from shadowvmm.errors import PeerCommandError, PeerError, PeerMissing, PeerStartError

from .daemon import READY_PROBES, Daemon
from .probe import StrPath, probe_features
from .process import PEER_CANDIDATES, Peer, find_peer
from .qsd import QsdBlk
from .refblk import RefBlk
from .testpmd import TESTPMD_FORWARD_MODES, DpdkTestpmd, DpdkVirtioUser, parse_port_stats
from .virtiofsd import Virtiofsd

#: Former name of :class:`.process.Peer` (benchmarks type their peers with it).
_Peer = Peer

__all__ = [
    "PEER_CANDIDATES",
    "READY_PROBES",
    "TESTPMD_FORWARD_MODES",
    "Daemon",
    "DpdkTestpmd",
    "DpdkVirtioUser",
    "Peer",
    "PeerCommandError",
    "PeerError",
    "PeerMissing",
    "PeerStartError",
    "QsdBlk",
    "RefBlk",
    "StrPath",
    "Virtiofsd",
    "find_peer",
    "parse_port_stats",
    "probe_features",
]
