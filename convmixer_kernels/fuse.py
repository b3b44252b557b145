"""fuse(model) / unfuse(model): swap fused kernels into any nn.Module tree by pattern matching.

Patterns, found in every nn.Sequential of the tree (the paper's ConvMixer, timm's ConvMixer, MobileNet-like
stacks all build their blocks from Sequentials), and conv -> BatchNormAct pairs anywhere:

* ``Residual(fn=Sequential(dwconv, act, BN))``                 -> FusedDepthwiseBlock(residual=True)
* a run ``conv, act, BN`` or ``conv, BN, act`` of a Sequential, where conv is
    - depthwise (groups = C, odd k, stride 1, "same" zero padding)   -> fused depthwise block
    - 1x1 (stride 1, no padding, groups 1)                         -> fused pointwise block
    - a patch embedding (k = stride = p, no padding, groups 1)       -> fused stem

* a conv (as above) followed by a BatchNorm that applies its own activation (timm's BatchNormAct2d, in its
  EfficientNet / MobileNet / ConvNormAct blocks: conv -> BN -> act), either next to each other in a
  Sequential or as children of any module whose forward passes the conv's output to the BN and nowhere
  else (checked on torch.fx traces of that forward, training and eval; a forward that does not trace, or
  takes more than the input, is left alone and reported).  What fuse() cannot see: another module's
  forward calling that conv directly (self.block.conv(x) from a parent): such a model must not be fused
                                                                   -> the same fused blocks, norm_act

A Sequential that is exactly such a run is replaced by FusedDepthwiseBlock / FusedPointwiseBlock /
FusedPatchEmbed holding the same children.  A run inside a longer Sequential keeps every position: the
conv becomes a fused conv (an nn.Conv2d subclass that runs the whole run), the activation and the BN
become pass-through placeholders that keep the BN's parameters and buffers.  Either way module names,
state-dict keys, parameter identity, dtype, device and memory format are unchanged, so checkpoints load
both ways and an optimizer built before fusing keeps working.  Anything else is left alone and reported."""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from . import functional as F_
from .modules import (FusedDepthwiseBlock, FusedPatchEmbed, FusedPointwiseBlock, _FusedConvActBN,
                      activation_name)


@dataclasses.dataclass
class FuseReport:
    fused: list = dataclasses.field(default_factory=list)    # (module name, what)
    skipped: list = dataclasses.field(default_factory=list)  # (module name, why)

    def __str__(self):
        lines = [f"fused {len(self.fused)} block(s), skipped {len(self.skipped)}"]
        lines += [f"  fused   {n or '<root>'}: {w}" for n, w in self.fused]
        lines += [f"  skipped {n or '<root>'}: {w}" for n, w in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- matching
def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def conv_kind(conv: nn.Conv2d) -> tuple[str | None, str]:
    """('dw' | 'pw' | 'stem', '') for a fusable conv, else (None, why not)."""
    k, s, d, g = conv.kernel_size, conv.stride, conv.dilation, conv.groups
    cin, cout = conv.in_channels, conv.out_channels
    if conv.padding_mode != "zeros":
        return None, f"padding_mode={conv.padding_mode!r} (only zeros)"
    if d != (1, 1):
        return None, f"dilation {d} (only 1)"
    if g == cin == cout and g > 1:
        if k[0] != k[1]:
            return None, f"non-square depthwise kernel {k}"
        if k[0] % 2 == 0:
            return None, f"even depthwise kernel size {k[0]}"
        if k[0] > 31:
            return None, f"depthwise kernel size {k[0]} > 31"
        if s != (1, 1):
            return None, f"depthwise stride {s} (only 1)"
        if conv.padding not in ("same", (k[0] // 2, k[1] // 2)):
            return None, f"depthwise padding {conv.padding!r} (only 'same')"
        return "dw", ""
    if g != 1:
        return None, f"groups={g} (only 1, or = channels for depthwise)"
    if k == (1, 1) and s == (1, 1) and conv.padding in ((0, 0), "valid"):
        return "pw", ""
    if k[0] == k[1] == s[0] == s[1] and k[0] > 1 and conv.padding in ((0, 0), "valid"):
        return "stem", ""
    return None, f"conv with kernel {k}, stride {s}, padding {conv.padding!r} is not depthwise, 1x1 or a patch embedding"


def match_run(mods: list[nn.Module], counts: dict[int, int]) -> tuple[dict | None, str | None]:
    """Match [conv, act, BN] or [conv, BN, act]: (plan, None), (None, why not), or (None, None) if not a candidate."""
    if len(mods) < 3 or type(mods[0]) is not nn.Conv2d:
        return None, None
    conv, a, b = mods[:3]
    if isinstance(b, nn.modules.batchnorm._BatchNorm):
        act, bn, order = a, b, "act_norm"
    elif isinstance(a, nn.modules.batchnorm._BatchNorm):
        act, bn, order = b, a, "norm_act"
    else:
        return None, None
    if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None, f"{type(bn).__name__} is not nn.BatchNorm2d or nn.SyncBatchNorm"
    return _plan(conv, act, bn, order, counts)


def _plan(conv, act, bn, order, counts) -> tuple[dict | None, str | None]:
    """The checks every matched conv, activation and BatchNorm pass: (plan, None) or (None, why not)."""
    kind, why = conv_kind(conv)
    if kind is None:
        return None, why
    if activation_name(act) is None:
        return None, (f"activation {type(act).__name__} is not supported (GELU, GELU(tanh), ReLU, SiLU, ReLU6, "
                      "Hardswish, Identity)")
    bn_name = type(bn).__name__
    if bn.num_features != conv.out_channels:
        return None, f"{bn_name}({bn.num_features}) does not match the conv's {conv.out_channels} channels"
    for m, what in ((conv, "conv"), (act, "activation"), (bn, bn_name)):
        if _has_hooks(m):
            return None, f"the {what} has hooks"
        if counts.get(id(m), 0) > 1:
            return None, f"the {what} is shared (used more than once in the model)"
    return dict(kind=kind, conv=conv, act=act, bn=bn, order=order), None


def bn_act_of(m: nn.Module) -> nn.Module | None:
    """The activation of a BatchNorm that applies its own after normalizing (timm's BatchNormAct2d: an
    nn.BatchNorm2d subclass with `act` and `drop` children, conv -> BN -> act in one module), else None."""
    if not isinstance(m, nn.BatchNorm2d) or "BatchNormAct" not in type(m).__name__:
        return None
    act, drop = m._modules.get("act"), m._modules.get("drop")
    if act is None or not (drop is None or isinstance(drop, nn.Identity)):
        return None
    return act


def match_pair(conv: nn.Module, bn: nn.Module, counts: dict[int, int]) -> tuple[dict | None, str | None]:
    """Match conv -> BatchNormAct (conv, BN, act with the act inside the BN module): (plan, None), (None, why
    not), or (None, None) if not a candidate."""
    act = bn_act_of(bn)
    if type(conv) is not nn.Conv2d or act is None:
        return None, None
    return _plan(conv, act, bn, "norm_act", counts)


def match_plain_pair(conv: nn.Module, bn: nn.Module, counts: dict[int, int]) -> dict | None:
    """Match conv -> BatchNorm2d with no activation after it (MobileNetV2's linear bottleneck, a BN followed by
    something other than a supported activation): the plan of a norm_act block with the identity, or None."""
    if type(conv) is not nn.Conv2d or type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None
    return _plan(conv, nn.Identity(), bn, "norm_act", counts)[0]


def direct_pairs(module: nn.Module) -> tuple[list[tuple[str, str]], str | None]:
    """(conv child, BatchNormAct child) pairs of a module whose forward calls each once and passes the conv's
    output to the BatchNormAct and nowhere else, and why none were looked for (None when they were).

    Read from torch.fx traces of the forward with every child a leaf, in training and in eval (a pair must
    be there in both: a branch on self.training), on a shallow copy of the module (a forward's side effects
    on its own attributes stay there).  Only a forward of the class taking the input alone: a trace sees
    the path of one set of arguments, and an instance's own forward is not the class's."""
    import inspect

    import torch.fx as fx

    class _ChildrenAreLeaves(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return True

    if "forward" in module.__dict__:
        return [], "its forward is set on the instance"
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if len(params) != 1 or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return [], "its forward takes more than the input"
    found = None
    for training in (True, False):
        clone = _retype(module, type(module))
        clone.training = training
        try:
            graph = _ChildrenAreLeaves().trace(clone)
        except Exception as e:  # noqa: BLE001  (any failure to trace: nothing is fused here)
            return [], f"its forward does not trace with torch.fx ({type(e).__name__}: {str(e)[:100]})"
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        pairs = set()
        for node in graph.nodes:
            if node.op != "call_module" or calls[node.target] != 1 or len(node.users) != 1:
                continue
            (user,) = node.users
            if user.op == "call_module" and calls[user.target] == 1 and user.args == (node,) and not user.kwargs \
                    and "." not in node.target and "." not in user.target:
                pairs.add((node.target, user.target))
        found = pairs if found is None else found & pairs
    return sorted(found), None


def _plain_sequential(m: nn.Module) -> bool:
    """An nn.Sequential that runs its children in order (a subclass with its own forward may not)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_residual(m: nn.Module) -> bool:
    return "Residual" in type(m).__name__ and list(m._modules) == ["fn"] and _plain_sequential(m.fn)


# ----------------------------------------------------------------------------------------------- placeholders
def _retype(m: nn.Module, cls):
    """A new module of class `cls` with m's attributes, parameters and buffers (same tensor objects)."""
    new = cls.__new__(cls)
    new.__dict__.update(m.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        new.__dict__[attr] = dict(m.__dict__[attr])
    return new


class FusedAway(nn.Identity):
    """Placeholder for an activation whose work a preceding fused conv does; keeps the original module."""

    def __init__(self, original: nn.Module, into: str):
        super().__init__()
        self.__dict__["_original"] = original
        self.into = into
        self.training = original.training

    def extra_repr(self):
        return f"{self._original!r} fused into ({self.into})"


class FusedAwayBatchNorm2d(nn.BatchNorm2d):
    """Placeholder that keeps a BatchNorm2d's parameters and buffers (same names, same tensors) while a
    preceding fused conv does its work; forward passes the input through."""

    def forward(self, x):
        return x

    def extra_repr(self):
        return super().extra_repr() + f", fused into ({self._fused_into})"


class FusedConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters) that computes conv -> act -> BN (or conv -> BN -> act) in one fused op,
    reading the BN's parameters and buffers from its placeholder in the parent Sequential."""

    def forward(self, x):
        bn, act_name, order, kind = self._fused_peers[0], self._fused_act, self._fused_order, self._fused_kind
        args = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        # the BN's own flag decides batch or running statistics, as in eager (model.train() then .eval() on
        # the BatchNorms, to freeze them, leaves the conv in training mode)
        kw = dict(training=bn.training, momentum=bn.momentum, eps=bn.eps, activation=act_name, order=order,
                  sync=self._fused_sync, process_group=self._fused_pg)
        if kind == "dw":
            return F_.dw_block(x, *args, residual=False, **kw)
        if kind == "pw":
            return F_.pw_block(x, *args, **kw)
        return F_.patch_embed(x, *args, **kw)

    def extra_repr(self):
        return super().extra_repr() + f", fused={self._fused_kind}: {self._fused_act}, order={self._fused_order}"


_STANDALONE = {"dw": FusedDepthwiseBlock, "pw": FusedPointwiseBlock, "stem": FusedPatchEmbed}
_KIND_NAMES = {"dw": "depthwise block", "pw": "pointwise block", "stem": "patch-embedding stem"}


# ----------------------------------------------------------------------------------------------- fuse
def _check_fusable_model(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            raise ValueError(f"model: module {name or '<root>'} ({type(m).__name__}) has uninitialised lazy "
                             "parameters; run one forward pass before fusing")
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            raise ValueError(f"model: {name} is on the meta device; materialise the model (to_empty + load "
                             "weights) before fusing")


def _fused_head_and_slot(plan, into: str, sync_bn, process_group):
    """The fused conv (runs the whole plan) and the BN's pass-through placeholder (keeps its parameters)."""
    head = _retype(plan["conv"], FusedConv2d)
    slot = _retype(plan["bn"], FusedAwayBatchNorm2d)
    slot.__dict__.update(_fused_into=into, _fused_orig_cls=type(plan["bn"]))
    head.__dict__.update(_fused_peers=[slot], _fused_act=activation_name(plan["act"]),
                         _fused_order=plan["order"], _fused_kind=plan["kind"],
                         _fused_sync=sync_bn or isinstance(plan["bn"], nn.SyncBatchNorm),
                         _fused_pg=process_group if process_group is not None
                         else getattr(plan["bn"], "process_group", None))
    return head, slot


def _fuse_pair(module: nn.Module, conv_name: str, bn_name: str, prefix: str, counts, report: FuseReport, sync_bn,
               process_group, plan=None) -> bool:
    """conv -> BatchNormAct children of module (the conv's output goes to the BN only), or a given plan of a
    conv -> BatchNorm2d pair: fused conv + placeholder."""
    if plan is None:
        plan, why = match_pair(module._modules[conv_name], module._modules[bn_name], counts)
        if plan is None:
            if why is not None:
                report.skipped.append((f"{prefix}{conv_name}", why))
            return False
    head, slot = _fused_head_and_slot(plan, conv_name, sync_bn, process_group)
    module._modules[conv_name] = head
    module._modules[bn_name] = slot
    what = f"{prefix}{conv_name}, {prefix}{bn_name} ({type(plan['bn']).__name__}) -> {_KIND_NAMES[plan['kind']]}"
    report.fused.append((f"{prefix}{conv_name}", f"{what} ({head._fused_act}, norm_act)"))
    return True


def _fuse_runs_in_place(seq: nn.Sequential, prefix: str, counts, report: FuseReport, sync_bn, process_group):
    """Runs conv, act, BN (or conv, BatchNormAct, or conv, BN not followed by a supported activation) inside a
    Sequential: fused conv + placeholders, every position kept."""
    names = list(seq._modules)
    i = 0
    while i < len(names):
        if i + 1 < len(names) and bn_act_of(seq._modules[names[i + 1]]) is not None:
            i += 2 if _fuse_pair(seq, names[i], names[i + 1], prefix, counts, report, sync_bn, process_group) else 1
            continue
        plan, why = match_run([seq._modules[n] for n in names[i:i + 3]], counts)
        if plan is None:
            pair = match_plain_pair(seq._modules[names[i]], seq._modules[names[i + 1]], counts) \
                if i + 1 < len(names) else None
            if pair is not None:  # conv, BN, then no supported activation: the BN's output as the block's
                _fuse_pair(seq, names[i], names[i + 1], prefix, counts, report, sync_bn, process_group, pair)
                i += 2
                continue
            if why is not None:
                report.skipped.append((f"{prefix}{names[i]}", why))
            i += 1
            continue
        into = names[i]
        head, slot = _fused_head_and_slot(plan, into, sync_bn, process_group)
        act_pos = 1 if plan["order"] == "act_norm" else 2
        seq._modules[names[i]] = head
        seq._modules[names[i + act_pos]] = FusedAway(plan["act"], into)
        seq._modules[names[i + 3 - act_pos]] = slot
        report.fused.append((f"{prefix}{names[i]}", f"{prefix}{names[i]}..{names[i + 2]} -> "
                             f"{_KIND_NAMES[plan['kind']]} ({head._fused_act}, {plan['order']})"))
        i += 3


def _set_sync(fused, sync_bn, process_group):
    if sync_bn:
        fused.sync_bn = True
    if process_group is not None:
        fused.process_group = process_group
    return fused


def _fuse_tree(module: nn.Module, prefix: str, counts, report: FuseReport, sync_bn=False, process_group=None):
    for name, child in list(module._modules.items()):
        if child is None or isinstance(child, (_FusedConvActBN, FusedConv2d, FusedAway, FusedAwayBatchNorm2d)):
            continue
        full = f"{prefix}{name}"
        if _is_residual(child) and len(child.fn) == 3 and not _has_hooks(child) and not _has_hooks(child.fn):
            plan, _ = match_run(list(child.fn), counts)
            if plan is not None and plan["kind"] == "dw":
                fused = FusedDepthwiseBlock.from_modules(plan["conv"], plan["act"], plan["bn"], plan["order"],
                                                         residual=True)
                fused.__dict__["_orig_cls"] = type(child)
                module._modules[name] = _set_sync(fused, sync_bn, process_group)
                report.fused.append((full, f"Residual -> FusedDepthwiseBlock({fused.extra_repr()})"))
                continue
        if type(child) is nn.Sequential and len(child) == 3 and not _has_hooks(child):
            plan, _ = match_run(list(child), counts)
            if plan is not None:
                cls = _STANDALONE[plan["kind"]]
                extra = {"residual": False} if cls is FusedDepthwiseBlock else {}
                fused = cls.from_modules(plan["conv"], plan["act"], plan["bn"], plan["order"], **extra)
                module._modules[name] = _set_sync(fused, sync_bn, process_group)
                report.fused.append((full, f"Sequential -> {cls.__name__}({fused.extra_repr()})"))
                continue
        _fuse_tree(child, f"{full}.", counts, report, sync_bn, process_group)
    if _plain_sequential(module):
        _fuse_runs_in_place(module, prefix, counts, report, sync_bn, process_group)
    elif any(bn_act_of(c) is not None for c in module._modules.values()) and not _has_hooks(module):
        # conv -> BatchNormAct children of any other module (timm's EfficientNet/MobileNet blocks, ConvNormAct)
        pairs, why = direct_pairs(module)
        if why is not None:
            report.skipped.append((prefix.rstrip("."), f"conv -> BatchNormAct pairs not looked for: {why}"))
        for conv_name, bn_name in pairs:
            if bn_act_of(module._modules[bn_name]) is not None:
                _fuse_pair(module, conv_name, bn_name, prefix, counts, report, sync_bn, process_group)


def fuse(model: nn.Module, inplace: bool = False, verbose: bool = False, return_report: bool = False,
         sync_bn: bool = False, process_group=None):
    """Swap fused kernels into `model` (a deep copy unless inplace=True).  See the module docstring.

    Returns the fused model (and a FuseReport if return_report).  verbose=True prints what was swapped
    and what was skipped and why.  Fusing a fused model again changes nothing.  sync_bn=True (and
    nn.SyncBatchNorm modules) compute batch statistics over `process_group` (default: the world), forward
    and backward, as nn.SyncBatchNorm does."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_fusable_model(model)
    if not inplace:
        model = copy.deepcopy(model)
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    report = FuseReport()
    _fuse_tree(model, "", counts, report, sync_bn, process_group)
    if verbose:
        print(report)
    return (model, report) if return_report else model


# ----------------------------------------------------------------------------------------------- unfuse
def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain PyTorch modules again, with the same parameters and buffers (the same tensor objects)."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, _FusedConvActBN):
        return _plain(model)
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        if isinstance(child, _FusedConvActBN):
            model._modules[name] = _plain(child)
        elif isinstance(child, FusedConv2d):
            conv = _retype(child, nn.Conv2d)
            for k in [k for k in conv.__dict__ if k.startswith("_fused")]:
                del conv.__dict__[k]
            model._modules[name] = conv
        elif isinstance(child, FusedAwayBatchNorm2d):
            bn = _retype(child, child.__dict__.get("_fused_orig_cls", nn.BatchNorm2d))
            for k in [k for k in bn.__dict__ if k.startswith("_fused")]:
                del bn.__dict__[k]
            model._modules[name] = bn
        elif isinstance(child, FusedAway):
            model._modules[name] = child._original
        else:
            unfuse(child, inplace=True)
    return model


def _plain(m: _FusedConvActBN) -> nn.Module:
    seq = nn.Sequential(m.conv, m.act, m.norm) if m.order == "act_norm" else nn.Sequential(m.conv, m.norm, m.act)
    if not m.residual:
        return seq
    cls = m.__dict__.get("_orig_cls")
    if cls is not None:
        try:
            return cls(seq)
        except TypeError:
            pass
    from .reference import Residual

    return Residual(seq)
