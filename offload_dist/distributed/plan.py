"""The sharding planner: which rank owns each module's offloaded copy, and on which tier.

A *plan* maps every *unit* (a module that holds tensors of its own) to an *owner* rank
and an *offload tier*. Every rank computes it from the same inputs, so it is a pure
function: no ``torch.distributed``, no I/O, no global state. ``Plan.digest()`` lets the
ranks check afterwards that they really did compute the same plan.

Inputs:
    units     ``Unit(name, nbytes, tie_group)``, in execution order.
    topology  ``Topology``: which node each rank is on, each node's host-memory and disk
              budgets, optional per-rank caps.
    policy    ``PlanPolicy``: preferred tier, whether disk may take the overflow, host
              headroom, which ranks may own, two tolerances.

Algorithm (see [Note: planner algorithm]):
    1. Units of one tie group become one *item* (one owner, one tier, bytes counted once).
    2. *Anchors*, items bigger than ``anchor_fraction`` x the mean bytes per owner
       (embeddings, lm_head, ...), reserve an owner first, biggest first, each on the
       least-loaded rank (LPT): a big unit at the end of the model cannot then land on a
       rank that is already full.
    3. Then every item, in execution order, goes to the least-loaded rank (an anchor to
       its reserved rank). A rank that owns an execution neighbour (previous or next
       unit) is charged ``adjacency_tolerance`` x the mean bytes per owner extra, so
       consecutive units go to different owners unless that costs more balance than
       the tolerance. With units of equal size this is a round-robin: the next modules
       to onload come from several ranks at once.
    4. Tiers are handed out in that same execution order, first fit: a unit takes the
       preferred tier on the best rank whose node budget (after headroom) and rank cap
       still have room, even if that is not its least-loaded rank. Only when no rank
       has room does it go to DISK, on the best rank whose node has disk room. So when
       host memory runs out it is the tail of the model that goes to disk, except for
       later units small enough to use what host memory is left.
    5. A unit that fits nowhere raises ``PlanError``, naming the unit, its size and what
       each node lacks.

Loads are counted in bytes over both tiers; ties are broken by rank id, then by
execution index, so the plan never depends on dict order or the hash seed.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from offload_dist.policy import Tier

if TYPE_CHECKING:
    import torch

__all__ = [
    "Assignment",
    "NodeSpec",
    "Plan",
    "PlanError",
    "PlanPolicy",
    "RankSpec",
    "Topology",
    "Unit",
    "format_bytes",
    "group_blocks",
    "make_plan",
    "units_from_module",
]

_FORMAT = "offload_dist.plan"
_FORMAT_VERSION = 1
# A budget of None means unlimited; inside the planner it is this many bytes, so that the
# arithmetic stays in exact integers.
_UNLIMITED = 1 << 100

# [Note: planner algorithm]
# Placement works on *items* (a tie group is one item) in two passes:
#   1. anchors (nbytes > anchor_fraction * mean) in decreasing size reserve an owner,
#      only to count their bytes in the loads before anything else is placed;
#   2. all items in execution order get their final owner and tier; an anchor keeps its
#      reserved owner when that rank has room on the tier being tried.
# An item goes to the rank with the smallest key
#       key(rank) = bytes owned by rank + penalty * [rank owns an execution neighbour]
# among the owner ranks with room on the tier being tried (preferred tier first, then
# DISK when allowed), penalty = adjacency_tolerance * mean. Ties: smaller rank id. The
# ranks of a node sit in one min-heap keyed by (bytes owned, rank), so a choice costs
# O(nodes + a few heap operations), not O(ranks): a DeepSeek-V3-sized model (45k units)
# on 64 ranks plans in under a second.
#
# Bound, when no budget binds: an item goes to a rank whose load is at most
# min_load + penalty, so max_load <= mean * (1 + adjacency_tolerance) + the biggest
# non-anchor item <= mean * (1 + adjacency_tolerance + anchor_fraction), unless one
# anchor alone is bigger than that.


class PlanError(ValueError):
    """No rank can hold a unit on any allowed tier within the budgets.

    Attributes:
        unit: name of the unit that could not be placed (the first of its tie group).
        nbytes: bytes of that unit (of its whole tie group).
        shortfall: node -> bytes that node lacks to hold the unit on the best of its
            ranks and allowed tiers.
    """

    def __init__(self, message: str, unit: str, nbytes: int, shortfall: dict[int, int]):
        super().__init__(message)
        self.unit = unit
        self.nbytes = nbytes
        self.shortfall = shortfall


def _check_bytes(value: int | None, what: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if optional else "an int"
        raise TypeError(f"{what} must be {kind} (bytes), got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0 bytes, got {value}")


@dataclass(frozen=True)
class Unit:
    """One module that holds tensors of its own: the planner's unit of placement.

    Attributes:
        name: module path, as in ``model.named_modules()``; unique within a plan.
        nbytes: bytes this unit adds to its owner: its distinct storages minus those an
            earlier unit of its tie group already holds (``units_from_module`` counts
            them so). A tie group's bytes are the sum of its units' ``nbytes``, so a
            tied tensor is counted once.
        tie_group: units that share a tensor (tied embeddings) carry the same group
            name, conventionally the name of the group's first unit; they get one owner
            and one tier. ``None``: not tied.
    """

    name: str
    nbytes: int
    tie_group: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"Unit.name must be a str, got {self.name!r}")
        _check_bytes(self.nbytes, f"Unit {self.name!r} nbytes", optional=False)
        if self.tie_group is not None and not isinstance(self.tie_group, str):
            raise TypeError(f"Unit {self.name!r} tie_group must be a str or None, "
                            f"got {self.tie_group!r}")


@dataclass(frozen=True)
class RankSpec:
    """One rank: the node it runs on and optional caps of its own.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        node: index of its node (the ``NodeSpec.node`` whose budgets it shares).
        host_bytes: most cpu-tier bytes this rank may own; ``None``: only the node's
            budget limits it.
        disk_bytes: most disk-tier bytes this rank may own; ``None``: node budget only.
    """

    rank: int
    node: int
    host_bytes: int | None = None
    disk_bytes: int | None = None

    def __post_init__(self) -> None:
        for attr in ("rank", "node"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"RankSpec.{attr} must be an int >= 0, got {value!r}")
        _check_bytes(self.host_bytes, f"rank {self.rank} host_bytes", optional=True)
        _check_bytes(self.disk_bytes, f"rank {self.rank} disk_bytes", optional=True)


@dataclass(frozen=True)
class NodeSpec:
    """One node's budgets, shared by all of its ranks.

    Attributes:
        node: node index.
        host_bytes: host memory the cpu tier may use on this node, summed over its
            ranks; ``None``: unlimited.
        disk_bytes: disk space the disk tier may use on this node (its local offload
            folder); ``None``: unlimited; ``0``: no disk tier on this node.
    """

    node: int
    host_bytes: int | None = None
    disk_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.node, bool) or not isinstance(self.node, int) or self.node < 0:
            raise ValueError(f"NodeSpec.node must be an int >= 0, got {self.node!r}")
        _check_bytes(self.host_bytes, f"node {self.node} host_bytes", optional=True)
        _check_bytes(self.disk_bytes, f"node {self.node} disk_bytes", optional=True)


@dataclass(frozen=True)
class Topology:
    """The ranks of a job, the node each runs on, and the nodes' budgets.

    Attributes:
        ranks: one ``RankSpec`` per rank, ranks ``0..world_size-1`` each exactly once;
            stored sorted by rank.
        nodes: one ``NodeSpec`` per node that has ranks; stored sorted by node.

    Raises:
        ValueError: ranks missing or repeated, a rank on a node with no ``NodeSpec``, a
            node listed twice or with no ranks.
    """

    ranks: tuple[RankSpec, ...]
    nodes: tuple[NodeSpec, ...]

    def __post_init__(self) -> None:
        ranks = tuple(sorted(self.ranks, key=lambda r: r.rank))
        nodes = tuple(sorted(self.nodes, key=lambda n: n.node))
        for r in ranks:
            if not isinstance(r, RankSpec):
                raise TypeError(f"Topology.ranks must hold RankSpec, got {r!r}")
        for n in nodes:
            if not isinstance(n, NodeSpec):
                raise TypeError(f"Topology.nodes must hold NodeSpec, got {n!r}")
        if not ranks:
            raise ValueError("Topology needs at least one rank")
        ids = [r.rank for r in ranks]
        if ids != list(range(len(ranks))):
            raise ValueError(f"Topology.ranks must be ranks 0..{len(ranks) - 1} each once, "
                             f"got {ids}")
        node_ids = [n.node for n in nodes]
        if len(set(node_ids)) != len(node_ids):
            raise ValueError(f"Topology.nodes lists a node twice: {node_ids}")
        used = {r.node for r in ranks}
        missing = sorted(used - set(node_ids))
        if missing:
            raise ValueError(f"ranks run on nodes {missing} that have no NodeSpec; add "
                             f"NodeSpec(node=..., host_bytes=..., disk_bytes=...) for them")
        empty = sorted(set(node_ids) - used)
        if empty:
            raise ValueError(f"nodes {empty} have no ranks; drop their NodeSpec")
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "nodes", nodes)

    @classmethod
    def uniform(cls, world_size: int, ranks_per_node: int, *, host_bytes: int | None = None,
                disk_bytes: int | None = None) -> Topology:
        """Builds ``world_size // ranks_per_node`` identical nodes, ranks packed in order.

        Args:
            world_size: number of ranks.
            ranks_per_node: ranks on each node (torchrun's ``--nproc_per_node``).
            host_bytes: each node's host budget; ``None``: unlimited.
            disk_bytes: each node's disk budget; ``None``: unlimited.

        Raises:
            ValueError: ``world_size`` is not a positive multiple of ``ranks_per_node``.
        """
        if ranks_per_node < 1 or world_size < 1 or world_size % ranks_per_node:
            raise ValueError(f"world_size ({world_size}) must be a positive multiple of "
                             f"ranks_per_node ({ranks_per_node}); build Topology(ranks, "
                             f"nodes) yourself for uneven nodes")
        n_nodes = world_size // ranks_per_node
        return cls(
            ranks=tuple(RankSpec(r, r // ranks_per_node) for r in range(world_size)),
            nodes=tuple(NodeSpec(n, host_bytes, disk_bytes) for n in range(n_nodes)),
        )

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    def node_of(self, rank: int) -> int:
        """The node index of ``rank``."""
        return self.ranks[rank].node

    def ranks_on(self, node: int) -> tuple[int, ...]:
        """The ranks of ``node``, in increasing order."""
        return tuple(r.rank for r in self.ranks if r.node == node)

    def node_spec(self, node: int) -> NodeSpec:
        """The ``NodeSpec`` of ``node``.

        Raises:
            KeyError: no such node.
        """
        for n in self.nodes:
            if n.node == node:
                return n
        raise KeyError(f"node {node} is not in the topology (nodes: "
                       f"{[n.node for n in self.nodes]})")


@dataclass(frozen=True)
class PlanPolicy:
    """How units are spread over ranks and tiers.

    Attributes:
        tier: preferred offload tier, ``Tier.CPU`` (default) or ``Tier.DISK`` (every
            unit on disk). ``Tier.DEVICE`` is not planned: units that stay on their
            onload device are not offloaded, leave them out of the unit list.
        allow_disk: with ``tier=Tier.CPU``, units that do not fit in host memory go to
            disk on a node with disk budget. ``False``: they raise ``PlanError``.
        host_headroom_fraction: fraction of each node's ``host_bytes`` kept free
            (activations, pinned staging, the OS), in ``[0, 1)``.
        host_headroom_bytes: bytes of each node's ``host_bytes`` kept free, on top of
            the fraction.
        owner_ranks: the ranks that may own units (e.g. one per node); ``None``: all.
        adjacency_tolerance: how much balance, as a fraction of the mean bytes per owner,
            the planner gives up to put consecutive units on different owners.
        anchor_fraction: items bigger than this fraction of the mean bytes per owner are
            placed first, biggest first; ``None``: no anchors, pure execution order.
    """

    tier: Tier = Tier.CPU
    allow_disk: bool = True
    host_headroom_fraction: float = 0.0
    host_headroom_bytes: int = 0
    owner_ranks: tuple[int, ...] | None = None
    adjacency_tolerance: float = 0.05
    anchor_fraction: float | None = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.tier, Tier):
            raise TypeError(f"PlanPolicy.tier must be a Tier, got {self.tier!r}")
        if self.tier is Tier.DEVICE:
            raise ValueError("PlanPolicy.tier=Tier.DEVICE: the planner places offloaded "
                             "copies; use Tier.CPU or Tier.DISK and leave device-resident "
                             "modules out of the unit list")
        if self.tier is Tier.DISK and not self.allow_disk:
            raise ValueError("PlanPolicy(tier=Tier.DISK, allow_disk=False) allows no tier; "
                             "set allow_disk=True or tier=Tier.CPU")
        if not isinstance(self.allow_disk, bool):
            raise TypeError(f"PlanPolicy.allow_disk must be a bool, got {self.allow_disk!r}")
        if not 0.0 <= float(self.host_headroom_fraction) < 1.0:
            raise ValueError(f"PlanPolicy.host_headroom_fraction must be in [0, 1), got "
                             f"{self.host_headroom_fraction!r}")
        _check_bytes(self.host_headroom_bytes, "PlanPolicy.host_headroom_bytes", optional=False)
        if not (self.adjacency_tolerance >= 0.0 and math.isfinite(self.adjacency_tolerance)):
            raise ValueError(f"PlanPolicy.adjacency_tolerance must be a finite number >= 0, "
                             f"got {self.adjacency_tolerance!r}")
        if self.anchor_fraction is not None and not self.anchor_fraction > 0.0:
            raise ValueError(f"PlanPolicy.anchor_fraction must be > 0 or None, got "
                             f"{self.anchor_fraction!r}")
        if self.owner_ranks is not None:
            owners = tuple(sorted(set(self.owner_ranks)))
            if not owners or any(isinstance(r, bool) or not isinstance(r, int) or r < 0
                                 for r in owners):
                raise ValueError(f"PlanPolicy.owner_ranks must be a non-empty collection of "
                                 f"ranks >= 0 or None, got {self.owner_ranks!r}")
            object.__setattr__(self, "owner_ranks", owners)

    def effective_host_bytes(self, host_bytes: int | None) -> int | None:
        """A node's host budget less the headroom; ``None`` stays unlimited."""
        if host_bytes is None:
            return None
        kept = math.floor(host_bytes * (1.0 - self.host_headroom_fraction))
        return max(0, kept - self.host_headroom_bytes)

    def tiers(self) -> tuple[Tier, ...]:
        """The tiers a unit may take, in order of preference."""
        if self.tier is Tier.DISK:
            return (Tier.DISK,)
        return (Tier.CPU, Tier.DISK) if self.allow_disk else (Tier.CPU,)


@dataclass(frozen=True)
class Assignment:
    """Where one unit's offloaded copy lives.

    Attributes:
        name: the unit (module path).
        owner: the rank that holds the offloaded copy; every other rank holds meta tensors.
        tier: ``Tier.CPU`` or ``Tier.DISK`` on the owner.
        nbytes: bytes the owner holds for this unit (``Unit.nbytes``).
        tie_group: the unit's tie group, ``None`` if untied.
    """

    name: str
    owner: int
    tier: Tier
    nbytes: int
    tie_group: str | None = None


@dataclass(frozen=True)
class Plan:
    """The placement of every unit: owner rank and tier, plus the inputs that produced it.

    Attributes:
        assignments: one per unit, in the units' (execution) order.
        topology: the ranks, nodes and budgets planned for.
        policy: the policy planned with.

    Raises:
        ValueError: two assignments for one name, an owner outside the topology, a tier
            other than CPU/DISK, or a tie group split over owners or tiers.
    """

    assignments: tuple[Assignment, ...]
    topology: Topology
    policy: PlanPolicy = PlanPolicy()
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        assignments = tuple(self.assignments)
        object.__setattr__(self, "assignments", assignments)
        index: dict[str, int] = {}
        groups: dict[str, tuple[int, Tier, str]] = {}
        world = self.topology.world_size
        for i, a in enumerate(assignments):
            if a.name in index:
                raise ValueError(f"unit {a.name!r} is assigned twice")
            index[a.name] = i
            if not 0 <= a.owner < world:
                raise ValueError(f"unit {a.name!r} has owner {a.owner}, outside ranks "
                                 f"0..{world - 1}")
            if a.tier not in (Tier.CPU, Tier.DISK):
                raise ValueError(f"unit {a.name!r} has tier {a.tier}; a plan holds only "
                                 f"Tier.CPU and Tier.DISK")
            if a.tie_group is not None:
                first = groups.setdefault(a.tie_group, (a.owner, a.tier, a.name))
                if first[:2] != (a.owner, a.tier):
                    raise ValueError(f"tie group {a.tie_group!r} is split: {first[2]!r} on "
                                     f"rank {first[0]} {first[1].value}, {a.name!r} on rank "
                                     f"{a.owner} {a.tier.value}")
        object.__setattr__(self, "_index", index)

    def __len__(self) -> int:
        return len(self.assignments)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def assignment(self, name: str) -> Assignment:
        """The assignment of unit ``name``.

        Raises:
            KeyError: ``name`` is not a unit of this plan.
        """
        try:
            return self.assignments[self._index[name]]
        except KeyError:
            raise KeyError(f"module {name!r} is not a unit of this plan ({len(self)} "
                           f"units); only modules with tensors of their own are units"
                           ) from None

    def owner_of(self, name: str) -> int:
        """The rank that owns unit ``name``. Raises ``KeyError`` for an unknown name."""
        return self.assignment(name).owner

    def tier_of(self, name: str) -> Tier:
        """The offload tier of unit ``name``. Raises ``KeyError`` for an unknown name."""
        return self.assignment(name).tier

    def owned_by(self, rank: int) -> tuple[str, ...]:
        """The units ``rank`` owns, in execution order."""
        return tuple(a.name for a in self.assignments if a.owner == rank)

    def per_rank_totals(self) -> dict[int, dict[Tier, int]]:
        """Bytes owned per rank and tier: ``{rank: {Tier.CPU: n, Tier.DISK: m}}``, all ranks."""
        totals = {r.rank: {Tier.CPU: 0, Tier.DISK: 0} for r in self.topology.ranks}
        for a in self.assignments:
            totals[a.owner][a.tier] += a.nbytes
        return totals

    def per_node_totals(self) -> dict[int, dict[Tier, int]]:
        """Bytes owned per node and tier: ``{node: {Tier.CPU: n, Tier.DISK: m}}``, all nodes."""
        totals = {n.node: {Tier.CPU: 0, Tier.DISK: 0} for n in self.topology.nodes}
        for rank, by_tier in self.per_rank_totals().items():
            node = self.topology.node_of(rank)
            for tier, nbytes in by_tier.items():
                totals[node][tier] += nbytes
        return totals

    def violations(self) -> list[str]:
        """Each budget this plan exceeds, as a sentence; empty when it fits.

        Host budgets are checked after ``policy``'s headroom.
        """
        problems = []
        for node, by_tier in self.per_node_totals().items():
            spec = self.topology.node_spec(node)
            host = self.policy.effective_host_bytes(spec.host_bytes)
            for tier, budget, what in ((Tier.CPU, host, "host budget after headroom"),
                                       (Tier.DISK, spec.disk_bytes, "disk budget")):
                if budget is not None and by_tier[tier] > budget:
                    problems.append(f"node {node}: {tier.value} tier holds "
                                    f"{format_bytes(by_tier[tier])}, {what} is "
                                    f"{format_bytes(budget)}")
        for rank, by_tier in self.per_rank_totals().items():
            spec = self.topology.ranks[rank]
            for tier, cap in ((Tier.CPU, spec.host_bytes), (Tier.DISK, spec.disk_bytes)):
                if cap is not None and by_tier[tier] > cap:
                    problems.append(f"rank {rank}: {tier.value} tier holds "
                                    f"{format_bytes(by_tier[tier])}, its cap is "
                                    f"{format_bytes(cap)}")
        return problems

    def fits(self) -> bool:
        """Whether every node budget and rank cap holds (see ``violations``)."""
        return not self.violations()

    # -- serialisation -------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON of the plan and its inputs: equal plans give equal strings."""
        doc = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "topology": {
                "ranks": [[r.rank, r.node, r.host_bytes, r.disk_bytes]
                          for r in self.topology.ranks],
                "nodes": [[n.node, n.host_bytes, n.disk_bytes] for n in self.topology.nodes],
            },
            "policy": {
                "tier": self.policy.tier.value,
                "allow_disk": self.policy.allow_disk,
                "host_headroom_fraction": float(self.policy.host_headroom_fraction),
                "host_headroom_bytes": self.policy.host_headroom_bytes,
                "owner_ranks": (None if self.policy.owner_ranks is None
                                else list(self.policy.owner_ranks)),
                "adjacency_tolerance": float(self.policy.adjacency_tolerance),
                "anchor_fraction": (None if self.policy.anchor_fraction is None
                                    else float(self.policy.anchor_fraction)),
            },
            "columns": ["name", "owner", "tier", "nbytes", "tie_group"],
            "assignments": [[a.name, a.owner, a.tier.value, a.nbytes, a.tie_group]
                            for a in self.assignments],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Reads a plan written by ``to_json``.

        Raises:
            ValueError: not a plan of this format version, or malformed.
        """
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a plan: invalid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"not a plan: expected a JSON object with format {_FORMAT!r}")
        if doc.get("version") != _FORMAT_VERSION:
            raise ValueError(f"plan format version {doc.get('version')!r} is not supported "
                             f"(this offload_dist reads version {_FORMAT_VERSION})")
        try:
            topo = doc["topology"]
            topology = Topology(
                ranks=tuple(RankSpec(*row) for row in topo["ranks"]),
                nodes=tuple(NodeSpec(*row) for row in topo["nodes"]),
            )
            pol = doc["policy"]
            policy = PlanPolicy(
                tier=Tier(pol["tier"]),
                allow_disk=pol["allow_disk"],
                host_headroom_fraction=pol["host_headroom_fraction"],
                host_headroom_bytes=pol["host_headroom_bytes"],
                owner_ranks=None if pol["owner_ranks"] is None else tuple(pol["owner_ranks"]),
                adjacency_tolerance=pol["adjacency_tolerance"],
                anchor_fraction=pol["anchor_fraction"],
            )
            assignments = tuple(Assignment(name, owner, Tier(tier), nbytes, group)
                                for name, owner, tier, nbytes, group in doc["assignments"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed plan JSON: {type(e).__name__}: {e}") from None
        return cls(assignments, topology, policy)

    def digest(self) -> str:
        """SHA-256 (hex) of ``to_json()``: ranks compare it to prove they hold one plan."""
        return hashlib.sha256(self.to_json().encode("ascii")).hexdigest()

    # -- display -------------------------------------------------------------------------

    def format_table(self, max_rows: int | None = 200) -> str:
        """A printable table of the plan.

        Consecutive units with the same owner and tier are one row (first .. last unit,
        count); then bytes per rank and per node against the budgets, and whether the
        plan fits.

        Args:
            max_rows: most unit rows printed; the middle rows are elided beyond it.
                ``None``: all rows.
        """
        runs: list[tuple[str, str, int, int, Tier, int]] = []
        for a in self.assignments:
            if runs and runs[-1][4] is a.tier and runs[-1][3] == a.owner:
                first, _, count, owner, tier, nbytes = runs[-1]
                runs[-1] = (first, a.name, count + 1, owner, tier, nbytes + a.nbytes)
            else:
                runs.append((a.name, a.name, 1, a.owner, a.tier, a.nbytes))

        def unit_row(run: tuple[str, str, int, int, Tier, int]) -> list[str]:
            first, last, count, owner, tier, nbytes = run
            names = first if count == 1 else f"{first} .. {last}"
            return [names, str(count), str(owner), tier.value, format_bytes(nbytes)]

        rows = [unit_row(r) for r in runs]
        elided = 0
        if max_rows is not None and len(rows) > max_rows:
            head = max_rows - max_rows // 2
            tail = max_rows // 2
            elided = len(rows) - head - tail
            rows = rows[:head] + [[f"... {elided} rows elided (format_table(max_rows=None) "
                                   f"prints all) ...", "", "", "", ""]] + rows[len(rows) - tail:]

        lines = [f"offload plan: {len(self)} units on {self.topology.world_size} ranks, "
                 f"{len(self.topology.nodes)} nodes; digest {self.digest()[:16]}"]
        lines += _table(["units (first .. last)", "count", "owner", "tier", "bytes"], rows,
                        right=(1, 2, 4))

        rank_rows = []
        for rank, by_tier in self.per_rank_totals().items():
            cpu, disk = by_tier[Tier.CPU], by_tier[Tier.DISK]
            rank_rows.append([str(rank), str(self.topology.node_of(rank)), format_bytes(cpu),
                              format_bytes(disk), format_bytes(cpu + disk)])
        lines.append("")
        lines.append("per rank:")
        lines += _table(["rank", "node", "cpu", "disk", "total"], rank_rows, right=(0, 1, 2, 3, 4))

        node_rows = []
        total_cpu = total_disk = 0
        for node, by_tier in self.per_node_totals().items():
            spec = self.topology.node_spec(node)
            host = self.policy.effective_host_bytes(spec.host_bytes)
            cpu, disk = by_tier[Tier.CPU], by_tier[Tier.DISK]
            total_cpu += cpu
            total_disk += disk
            ok = (host is None or cpu <= host) and (spec.disk_bytes is None
                                                     or disk <= spec.disk_bytes)
            node_rows.append([str(node), str(len(self.topology.ranks_on(node))),
                              format_bytes(cpu), _budget(host), format_bytes(disk),
                              _budget(spec.disk_bytes), "yes" if ok else "NO"])
        lines.append("")
        lines.append("per node:")
        lines += _table(["node", "ranks", "cpu", "host budget", "disk", "disk budget", "fits"],
                        node_rows, right=(0, 1, 2, 3, 4, 5))
        lines.append("")
        lines.append(f"total: cpu {format_bytes(total_cpu)}, disk {format_bytes(total_disk)}, "
                     f"all {format_bytes(total_cpu + total_disk)}")
        problems = self.violations()
        lines.append("fits: yes" if not problems else "fits: NO: " + "; ".join(problems))
        return "\n".join(lines)


def format_bytes(nbytes: int) -> str:
    """``1288490188`` -> ``'1.20 GiB'``; binary units, about three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024.0 or unit == "PiB":
            break
        value /= 1024.0
    if unit == "B":
        return f"{nbytes} B"
    digits = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:.{digits}f} {unit}"


def _budget(nbytes: int | None) -> str:
    return "unlimited" if nbytes is None else format_bytes(nbytes)


def _table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    right = set(right)
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


# -- the planner ---------------------------------------------------------------------------


@dataclass
class _Item:
    """A tie group (or one untied unit): placed as one."""

    first: int              # execution index of its first unit
    units: list[int]        # execution indices of its units
    nbytes: int
    neighbours: list[int] = field(default_factory=list)  # item ids adjacent in execution


class _Ledger:
    """Free space and loads while planning; each node's ranks in a (load, rank) min-heap."""

    def __init__(self, topology: Topology, policy: PlanPolicy, owners: tuple[int, ...]):
        self.load = [0] * topology.world_size
        self.free: dict[Tier, dict[int, int]] = {Tier.CPU: {}, Tier.DISK: {}}
        for n in topology.nodes:
            host = policy.effective_host_bytes(n.host_bytes)
            self.free[Tier.CPU][n.node] = _UNLIMITED if host is None else host
            self.free[Tier.DISK][n.node] = _UNLIMITED if n.disk_bytes is None else n.disk_bytes
        self.rank_free: dict[Tier, list[int]] = {
            Tier.CPU: [_UNLIMITED if r.host_bytes is None else r.host_bytes
                       for r in topology.ranks],
            Tier.DISK: [_UNLIMITED if r.disk_bytes is None else r.disk_bytes
                        for r in topology.ranks],
        }
        self.node_of = [r.node for r in topology.ranks]
        self.heaps: dict[int, list[tuple[int, int]]] = {}
        for rank in owners:
            self.heaps.setdefault(self.node_of[rank], []).append((0, rank))
        self.nodes = sorted(self.heaps)
        for heap in self.heaps.values():
            heapq.heapify(heap)

    def fits(self, rank: int, nbytes: int, tier: Tier) -> bool:
        """Whether ``rank`` (its node budget and its own cap) has room for ``nbytes`` on ``tier``."""
        return (self.free[tier][self.node_of[rank]] >= nbytes
                and self.rank_free[tier][rank] >= nbytes)

    def choose(self, nbytes: int, tier: Tier | None, avoid: set[int], penalty: int) -> int | None:
        """The owner rank with the smallest (load + penalty if in ``avoid``, rank).

        Only ranks with room for ``nbytes`` on ``tier`` count; ``tier=None``: all do.
        Returns ``None`` when no rank has room.
        """
        if tier is None:
            free_node: dict[int, int] = dict.fromkeys(self.nodes, _UNLIMITED)
            rank_free = [_UNLIMITED] * len(self.load)
        else:
            free_node, rank_free = self.free[tier], self.rank_free[tier]
        best: tuple[int, int] | None = None
        popped: list[tuple[int, list[tuple[int, int]]]] = []
        for node in self.nodes:
            heap = self.heaps[node]
            if free_node[node] < nbytes or (best is not None and heap[0] > best):
                continue
            taken = []
            while heap:
                load, rank = heapq.heappop(heap)
                taken.append((load, rank))
                if rank_free[rank] < nbytes:
                    continue
                key = (load + penalty, rank) if rank in avoid else (load, rank)
                if best is None or key < best:
                    best = key
                if rank not in avoid:
                    break  # the cheapest rank of this node that is not avoided
            popped.append((node, taken))
        for node, taken in popped:
            for _, rank in taken:
                heapq.heappush(self.heaps[node], (self.load[rank], rank))
        return None if best is None else best[1]

    def add_load(self, rank: int, nbytes: int) -> None:
        """Changes ``rank``'s load by ``nbytes`` (may be negative), keeping its heap entry."""
        # Invariant: each owner rank has exactly one entry, (its load, rank), in its node's heap.
        heap = self.heaps[self.node_of[rank]]
        heap.remove((self.load[rank], rank))
        heapq.heapify(heap)
        self.load[rank] += nbytes
        heapq.heappush(heap, (self.load[rank], rank))

    def take(self, rank: int, nbytes: int, tier: Tier) -> None:
        """Places ``nbytes`` on ``rank``'s ``tier``: its load and the free space change."""
        self.add_load(rank, nbytes)
        self.free[tier][self.node_of[rank]] -= nbytes
        self.rank_free[tier][rank] -= nbytes


def make_plan(units: Sequence[Unit], topology: Topology,
              policy: PlanPolicy = PlanPolicy()) -> Plan:
    """Assigns each unit an owner rank and a tier (see the module docstring).

    Pure and deterministic: the same arguments give the same plan, byte for byte, in
    every process.

    Args:
        units: the units in execution order (``units_from_module``).
        topology: ranks, nodes and budgets.
        policy: preferred tier, disk overflow, headroom, owners, tolerances.

    Returns:
        The ``Plan``, assignments in the order of ``units``.

    Raises:
        PlanError: a unit fits on no rank within the budgets.
        ValueError: two units with one name, ``policy.owner_ranks`` naming a rank outside
            the topology.
        TypeError: an element of ``units`` is not a ``Unit``.
    """
    units = list(units)
    seen: set[str] = set()
    for u in units:
        if not isinstance(u, Unit):
            raise TypeError(f"make_plan expects Unit objects, got {type(u).__name__}: {u!r}")
        if u.name in seen:
            raise ValueError(f"two units are named {u.name!r}; unit names must be unique")
        seen.add(u.name)
    owners = policy.owner_ranks if policy.owner_ranks is not None else tuple(
        range(topology.world_size))
    bad = [r for r in owners if r >= topology.world_size]
    if bad:
        raise ValueError(f"PlanPolicy.owner_ranks names ranks {bad} outside the topology "
                         f"(world size {topology.world_size})")

    # Items: one per tie group or untied unit, ordered by first execution index.
    items: list[_Item] = []
    item_of = [0] * len(units)
    group_item: dict[str, int] = {}
    for i, u in enumerate(units):
        if u.tie_group is not None and u.tie_group in group_item:
            item = items[group_item[u.tie_group]]
            item.units.append(i)
            item.nbytes += u.nbytes
            item_of[i] = group_item[u.tie_group]
            continue
        item_of[i] = len(items)
        if u.tie_group is not None:
            group_item[u.tie_group] = len(items)
        items.append(_Item(first=i, units=[i], nbytes=u.nbytes))
    for i in range(len(units)):
        for j in (i - 1, i + 1):
            if 0 <= j < len(units) and item_of[j] != item_of[i]:
                nbrs = items[item_of[i]].neighbours
                if item_of[j] not in nbrs:
                    nbrs.append(item_of[j])

    total = sum(it.nbytes for it in items)
    mean = total // len(owners)
    penalty = max(1, int(policy.adjacency_tolerance * mean))
    ledger = _Ledger(topology, policy, owners)
    owner: list[int | None] = [None] * len(items)  # reserved (anchors) or final owner
    tier_of: list[Tier | None] = [None] * len(items)

    # Pass 1: anchors reserve an owner, biggest first (LPT), budgets not yet charged.
    if policy.anchor_fraction is not None:
        threshold = policy.anchor_fraction * mean
        anchors = sorted((k for k in range(len(items)) if items[k].nbytes > threshold),
                         key=lambda k: (-items[k].nbytes, k))
        for k in anchors:
            avoid = {owner[j] for j in items[k].neighbours if owner[j] is not None}
            rank = ledger.choose(items[k].nbytes, None, avoid, penalty)
            assert rank is not None  # tier=None: every owner rank qualifies
            ledger.add_load(rank, items[k].nbytes)
            owner[k] = rank

    # Pass 2: execution order; tiers are handed out first-fit in this order.
    for k, item in enumerate(items):
        reserved = owner[k]
        if reserved is not None:
            ledger.add_load(reserved, -item.nbytes)  # re-placed below, usually on itself
        avoid = {owner[j] for j in item.neighbours if owner[j] is not None}
        for tier in policy.tiers():
            if reserved is not None and ledger.fits(reserved, item.nbytes, tier):
                rank: int | None = reserved
            else:
                rank = ledger.choose(item.nbytes, tier, avoid, penalty)
            if rank is not None:
                ledger.take(rank, item.nbytes, tier)
                owner[k], tier_of[k] = rank, tier
                break
        else:
            left = items[k:]
            raise _plan_error(units, item, ledger, policy, owners,
                              sum(len(it.units) for it in left), sum(it.nbytes for it in left))

    assignments = []
    for i, u in enumerate(units):
        k = item_of[i]
        assignments.append(Assignment(u.name, owner[k], tier_of[k], u.nbytes,  # type: ignore[arg-type]
                                      u.tie_group))
    return Plan(tuple(assignments), topology, policy)


def _plan_error(units: list[Unit], item: _Item, ledger: _Ledger, policy: PlanPolicy,
                owners: tuple[int, ...], units_left: int,
                bytes_left: int) -> PlanError:
    first = units[item.first]
    what = f"unit {first.name!r}"
    if len(item.units) > 1:
        what += (f" (tie group {first.tie_group!r} of {len(item.units)} units: "
                 + ", ".join(repr(units[i].name) for i in item.units[:4])
                 + (", ..." if len(item.units) > 4 else "") + ")")
    tiers = policy.tiers()
    shortfall: dict[int, int] = {}
    parts = []
    free_all = 0
    for node in ledger.nodes:
        ranks = [r for r in owners if ledger.node_of[r] == node]
        room = {t: max(min(ledger.free[t][node], ledger.rank_free[t][r]) for r in ranks)
                for t in tiers}
        free_all += sum(ledger.free[t][node] for t in tiers)
        shortfall[node] = item.nbytes - max(room.values())
        where = " or ".join({Tier.CPU: "host memory", Tier.DISK: "disk"}[t] for t in tiers)
        free = ", ".join(f"{'host' if t is Tier.CPU else 'disk'} {format_bytes(room[t])}"
                         for t in tiers)
        parts.append(f"needs {format_bytes(shortfall[node])} more {where} on node {node} "
                     f"(largest free on one owner rank: {free})")
    if Tier.DISK not in tiers:
        fix = ("raise NodeSpec.host_bytes, lower PlanPolicy.host_headroom_*, or let the "
               "overflow go to disk with PlanPolicy(allow_disk=True) and a disk budget")
    else:
        fix = "raise NodeSpec.host_bytes or NodeSpec.disk_bytes (or the rank caps)"
    free_text = ("unlimited node budgets (rank caps bind)" if free_all >= _UNLIMITED
                 else f"{format_bytes(free_all)} free on the allowed tiers in all")
    msg = (f"cannot place {what}, {format_bytes(item.nbytes)}: no owner rank has room. "
           + "; ".join(parts) + f". Still to place: {units_left} unit"
           f"{'s' if units_left != 1 else ''}, {format_bytes(bytes_left)}, with {free_text}. "
           f"Fix: {fix}.")
    return PlanError(msg, first.name, item.nbytes, shortfall)


# -- units from a module -------------------------------------------------------------------


def _leaves(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or a subclass's inner tensors."""
    if hasattr(type(t), "__tensor_flatten__"):
        attrs, _ = t.__tensor_flatten__()
        out: list[torch.Tensor] = []
        for a in attrs:
            out += _leaves(getattr(t, a))
        return out
    return [t]


def _storage_key(t: torch.Tensor) -> tuple[tuple[Any, ...], int]:
    """(identity of ``t``'s storage, bytes of that storage)."""
    try:
        storage = t.untyped_storage()
        # The StorageImpl pointer: shared by every view and alias, distinct otherwise, also
        # on the meta device (where data_ptr() is 0 for every tensor).
        return ("storage", storage._cdata), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        # No storage (e.g. sparse layouts): count the elements, identify by object.
        return ("tensor", id(t)), t.numel() * t.element_size()


def units_from_module(module: torch.nn.Module) -> list[Unit]:
    """One ``Unit`` per submodule that has parameters or buffers of its own.

    Units follow ``module.named_modules()`` order (the root is named ``""``). A unit's
    bytes are those of the distinct storages of its own (``recurse=False``) parameters
    and buffers, persistent or not; a tensor subclass with ``__tensor_flatten__``
    counts its inner tensors. Storage sizes are read from the storage, which is also
    right on the meta device (an expanded view counts its storage, not numel x size).

    Units that share a storage (tied weights, one Parameter in two modules, views of one
    buffer) form a tie group named after its first unit; a shared storage is counted in
    the first unit that holds it only, so a group's ``nbytes`` sum to its distinct bytes.

    Args:
        module: any ``nn.Module``, on any device including meta.

    Returns:
        The units, in execution (``named_modules``) order.
    """
    names: list[str] = []
    sizes: list[int] = []
    holder: dict[tuple[Any, ...], int] = {}   # storage key -> index of first unit holding it
    parent: list[int] = []                    # union-find over unit indices

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for name, mod in module.named_modules():
        tensors = [t for _, t in mod.named_parameters(recurse=False)]
        tensors += [t for _, t in mod.named_buffers(recurse=False)]
        if not tensors:
            continue
        idx = len(names)
        names.append(name)
        parent.append(idx)
        nbytes = 0
        for t in tensors:
            for leaf in _leaves(t):
                key, size = _storage_key(leaf)
                owner = holder.get(key)
                if owner is None:
                    holder[key] = idx
                    nbytes += size
                elif owner != idx:
                    # Union by smallest index, so a group's root is its first unit.
                    a, b = find(owner), find(idx)
                    parent[max(a, b)] = min(a, b)
        sizes.append(nbytes)

    roots = [find(i) for i in range(len(names))]
    members: dict[int, int] = {}
    for r in roots:
        members[r] = members.get(r, 0) + 1
    return [Unit(names[i], sizes[i], names[roots[i]] if members[roots[i]] > 1 else None)
            for i in range(len(names))]


def group_blocks(units: Sequence[Unit], blocks: Sequence[str], world_size: int) -> tuple[list[Unit], list[str]]:
    """Puts the units inside each block into one tie group: one owner, one tier.

    A *block* is a module path (a decoder layer); its units are the unit named so and
    those below it. A block joins only if the group it makes (with the units tied to
    its own) holds at most ``1 / (2 * world_size)`` of all bytes, so whole blocks still
    balance the owners, and only if it has at least two units. A block's group merges
    with the tie groups its units already belong to; every merged group is named after
    its first unit, as ties are.

    Args:
        units: in execution order (``units_from_module`` or the loader's).
        blocks: candidate block paths (see ``offload_dist.distributed.groups.find_blocks``).
        world_size: ranks that will own units.

    Returns:
        ``(units, grouped)``: the units with their new ``tie_group`` (same order and
        bytes) and the blocks that were grouped.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    units = list(units)
    total = sum(u.nbytes for u in units)
    parent = list(range(len(units)))
    group_bytes = [u.nbytes for u in units]  # bytes of the group each root unit heads

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        a, b = find(a), find(b)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root stays the first unit
            group_bytes[min(a, b)] += group_bytes[max(a, b)]

    first_of_tie: dict[str, int] = {}
    for i, u in enumerate(units):
        if u.tie_group is not None:
            union(first_of_tie.setdefault(u.tie_group, i), i)
    wanted = set(blocks)
    inside: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        parts = u.name.split(".")
        for k in range(1, len(parts) + 1):
            if (prefix := ".".join(parts[:k])) in wanted:
                inside.setdefault(prefix, []).append(i)
                break
    grouped: list[str] = []
    for block in dict.fromkeys(blocks):
        members = inside.get(block, [])
        # What the block's group would hold: its units and everything tied to them,
        # blocks grouped before included (a weight tied across blocks merges them).
        nbytes = sum(group_bytes[r] for r in {find(i) for i in members})
        if len(members) < 2 or nbytes * 2 * world_size > total:
            continue
        for i in members[1:]:
            union(members[0], i)
        grouped.append(block)
    size: dict[int, int] = {}
    for i in range(len(units)):
        size[find(i)] = size.get(find(i), 0) + 1
    out = [Unit(u.name, u.nbytes, units[find(i)].name if size[find(i)] > 1 or u.tie_group is not None else None)
           for i, u in enumerate(units)]
    return out, grouped
