"""Weights on transparent huge pages: the buffer is 2-MB aligned and marked MADV_HUGEPAGE, a collapse the kernel
reports done leaves huge pages (both read back from /proc/self/smaps), moved parameters keep their values and
identity, and FastDecoder's model still decodes like stock transformers and saves like any model."""

from __future__ import annotations

import gc
import mmap
import os
import warnings

import pytest
import torch
from conftest import REPO_ROOT, run_python_json, twin_models

from modeling_llama import FastDecoder, huge_pages

needs_thp = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages (not Linux, or THP never)")


def _own_mapping(nbytes: int, dtype: torch.dtype, advice: int | None = None) -> torch.Tensor:
    """A tensor over an anonymous private mapping of its own (not malloc's heap), optionally ``madvise``d first."""
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    if advice is not None:
        region.madvise(advice)
    with warnings.catch_warnings():  # (torch warns that it does not own the buffer: the tensor keeps it alive)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(region, dtype=dtype)


@needs_thp
def test_empty_is_aligned_and_marked_for_huge_pages():
    buf = huge_pages.empty(9 << 20)
    assert buf.dtype == torch.uint8 and buf.numel() == 9 << 20
    assert buf.data_ptr() % huge_pages.PAGE_BYTES == 0
    assert huge_pages.advised(buf), "the buffer's mapping lacks MADV_HUGEPAGE (VmFlags hg)"
    # The control: a mapping marked MADV_NOHUGEPAGE reads as not advised and gets no huge pages, whatever the
    # system's THP mode. (Not torch's own memory: whether malloc's mappings carry the advice depends on the
    # environment (THP_MEM_ALLOC_ENABLE, glibc's hugetlb tunable, a process-wide THP policy); one CI machine's did.)
    control = _own_mapping(9 << 20, torch.uint8, advice=mmap.MADV_NOHUGEPAGE)
    assert not huge_pages.advised(control), huge_pages._smaps_entry(control.data_ptr())
    buf.fill_(1)  # first touch: the kernel allocates the pages now, huge ones as far as it has free 2-MB blocks
    control.fill_(1)
    assert huge_pages.huge_page_bytes(control) == 0
    assert not huge_pages.collapse(control)  # the kernel refuses a mapping marked "no huge pages"
    # Huge pages at first touch are the kernel's best effort (none where memory is fragmented and THP's defrag
    # setting forbids compaction); a collapse compacts if it must, and when the kernel says it did, they are there.
    if huge_pages.collapse(buf):
        assert huge_pages.huge_page_bytes(buf) >= 8 << 20
    assert torch.all(buf == 1)
    assert huge_pages.empty(0).numel() == 0


@needs_thp
def test_the_buffer_is_its_own_mapping_and_goes_back_when_freed():
    """The advice stays on the buffer's own mapping (malloc's heap, reused later for other allocations, would carry
    it on), and the mapping is unmapped once no view of it is left."""
    buf = huge_pages.empty(3 << 20)
    address = buf.data_ptr()
    view = buf[100:200]
    fields = huge_pages._smaps_entry(address)
    assert "hg" in fields["VmFlags"].split()
    assert int(fields["Size"].split()[0]) <= 5 << 10  # kB: the 4 MB advised, not a larger heap mapping
    del buf
    gc.collect()
    assert huge_pages.advised(view)  # a view keeps it mapped
    del view
    gc.collect()
    assert huge_pages._smaps_entry(address) == {}


@needs_thp
def test_collapse_backs_whole_pages_of_plain_memory_and_keeps_values():
    # plain memory in one mapping of its own, on 4 KB pages (not advised; torch's allocation could lie across two
    # mappings of malloc's heap, and a 2-MB page cannot straddle two mappings, so a collapse leaves it small)
    x = _own_mapping(9 << 20, torch.float32)
    x.copy_(torch.arange(x.numel(), dtype=torch.float32))
    before = huge_pages.huge_page_bytes(x)
    if huge_pages.thp_mode() == "madvise" and not huge_pages.advised(x):  # (a process-wide policy may advise it)
        assert before == 0
    if huge_pages.collapse(x):  # False on kernels before 6.1 or when no memory could be compacted
        start = x.data_ptr()
        mappings = huge_pages._smaps_entries(start, start + x.numel() * 4)
        # the 2-MB pages wholly inside 9 MB starting anywhere: at least three
        assert huge_pages.huge_page_bytes(x) >= max(before, 6 << 20), mappings
    assert torch.equal(x, torch.arange(9 << 18, dtype=torch.float32))
    assert not huge_pages.collapse(torch.ones(1000))  # no whole 2-MB page inside


@needs_thp
def test_move_parameters_keeps_values_and_objects():
    torch.manual_seed(0)
    lin = torch.nn.Linear(1000, 3000, bias=False)
    emb = torch.nn.Embedding(50, 1000)
    frozen = torch.nn.Parameter(torch.randn(7, 5), requires_grad=False)
    params = [lin.weight, emb.weight, lin.weight, frozen]  # lin.weight twice: moved once
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    moved = huge_pages.move_parameters(params)
    assert moved == sum(-(-p.numel() * 4 // 64) * 64 for p in (lin.weight, emb.weight, frozen))
    for p, b, i in zip(params, before, ids):
        assert id(p) == i and isinstance(p, torch.nn.Parameter)
        assert torch.equal(p, b)
    assert lin.weight.requires_grad and not frozen.requires_grad
    assert lin.weight.data_ptr() % huge_pages.PAGE_BYTES == 0  # the first in the buffer
    assert emb.weight.data_ptr() % 64 == 0 and frozen.data_ptr() % 64 == 0
    assert huge_pages.advised(lin.weight) and huge_pages.advised(frozen)
    # a moved parameter still trains: its gradient lands where autograd expects it
    lin(torch.randn(2, 1000)).sum().backward()
    assert lin.weight.grad.shape == lin.weight.shape


def test_nothing_moves_when_switched_off_or_not_possible(monkeypatch):
    p = torch.nn.Parameter(torch.randn(4, 4))
    ptr = p.data_ptr()
    monkeypatch.setenv(huge_pages.ENV_VAR, "0")
    assert not huge_pages.available()
    assert huge_pages.move_parameters([p]) == 0 and p.data_ptr() == ptr
    assert huge_pages.empty(100).numel() == 100  # a plain tensor then
    assert not huge_pages.collapse(torch.empty(9 << 20, dtype=torch.uint8))
    monkeypatch.delenv(huge_pages.ENV_VAR)
    q = torch.nn.Parameter(torch.randn(4, 4).t())  # not contiguous: left alone
    ptr_q = q.data_ptr()
    assert huge_pages.move_parameters([q]) == 0 and q.data_ptr() == ptr_q
    with pytest.raises(ValueError, match="nbytes"):
        huge_pages.empty(-1)


@needs_thp
def test_fast_decoder_weights_on_huge_pages_decode_and_save(tmp_path):
    from transformers import LlamaForCausalLM as StockLlama

    ours, stock = twin_models(seed=3)
    linears = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    dec = FastDecoder(ours, batch_size=2, max_length=24, dtype=torch.float32, compile=False)
    assert dec.huge_page_bytes == sum(-(-w.numel() * 4 // 64) * 64 for w in linears)
    assert linears[0].data_ptr() % huge_pages.PAGE_BYTES == 0
    prompt = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = stock.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    assert torch.equal(dec.generate(prompt, 9), ref[:, 7:])
    # the weights now share one buffer; saving and loading through stock transformers still round-trips
    ours.save_pretrained(tmp_path)
    loaded = StockLlama.from_pretrained(tmp_path)
    for name, value in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    off = FastDecoder(stock, batch_size=2, max_length=24, dtype=torch.float32, compile=False, huge_pages=False)
    assert off.huge_page_bytes == 0


@needs_thp
def test_a_compiled_decoder_still_right_after_the_weights_move_again():
    """A second FastDecoder on the same model moves the weights to a new buffer: the first decoder's compiled steps
    read the parameters at each call, so they still decode right (and the old buffer is freed)."""
    ours, stock = twin_models(seed=4)
    prompt = torch.randint(3, 512, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = stock.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)[:, 5:]
    torch._dynamo.reset()
    first = FastDecoder(ours, batch_size=3, max_length=16, dtype=torch.float32)
    assert torch.equal(first.generate(prompt, 6), ref)
    before = ours.lm_head.weight.data_ptr()
    second = FastDecoder(ours, batch_size=3, max_length=16, dtype=torch.float32, compile=False)
    assert second.huge_page_bytes > 0 and ours.lm_head.weight.data_ptr() != before
    assert torch.equal(first.generate(prompt, 6), ref)
    assert torch.equal(second.generate(prompt, 6), ref)


_SECCOMP_CHILD = r"""
import ctypes, errno, json, sys, warnings
import torch
from modeling_llama import FastDecoder, huge_pages

class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

lib = ctypes.CDLL("libseccomp.so.2")
lib.seccomp_init.restype = ctypes.c_void_p
ctx = ctypes.c_void_p(lib.seccomp_init(0x7FFF0000))  # default: allow
EQ, ERRNO = 4, 0x00050000
def refuse(name, arg, value, err):
    rule = Cmp(arg, EQ, value, 0)
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    assert lib.seccomp_rule_add_array(ctx, ERRNO | err, nr, 1, ctypes.byref(rule)) == 0
refused = sys.argv[1]
if refused == "mmap":  # the mapping for a 3 MB buffer: 4 MB of whole huge pages + 2 MB to align
    refuse("mmap", 1, 6 << 20, errno.ENOMEM)
else:  # every madvise(MADV_HUGEPAGE)
    refuse("madvise", 2, 14, errno.EPERM)
assert lib.seccomp_load(ctx) == 0

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    buf = huge_pages.empty(3 << 20)
assert buf.numel() == 3 << 20 and not huge_pages.advised(buf), refused
assert any("ordinary memory" in str(w.message) for w in caught), [str(w.message) for w in caught]
buf.fill_(7)
assert int(buf.sum()) == 7 * (3 << 20)
if refused == "madvise":  # every buffer is refused: nothing moves, and decoding is unchanged
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    weight = model.lm_head.weight
    ptr = weight.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert huge_pages.move_parameters([weight]) == 0 and weight.data_ptr() == ptr
        prompt = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        dec = FastDecoder(model, batch_size=2, max_length=16, dtype=torch.float32, compile=False)
    assert dec.huge_page_bytes == 0
    assert torch.equal(dec.generate(prompt, 6), ref[:, 5:])
print(json.dumps({"ok": refused}))
"""


def _libseccomp() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    return True


@needs_thp
@pytest.mark.skipif(not _libseccomp(), reason="libseccomp (to make the kernel refuse a call) is not installed")
@pytest.mark.parametrize("refused", ["mmap", "madvise"])
def test_a_refused_mapping_or_advice_falls_back_to_ordinary_memory(refused):
    """Where the system refuses the buffer's mapping (an address-space limit) or the advice (a kernel without THP, a
    sandbox), empty() warns and returns ordinary memory, move_parameters moves nothing, and FastDecoder decodes as
    before. The kernel really refuses: a seccomp filter in a child process (libseccomp, through ctypes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    assert run_python_json(_SECCOMP_CHILD, refused, cwd=REPO_ROOT, env=env) == {"ok": refused}
