"""Rewrites the ``kernel<<<grid, block[, shared, stream]>>>(args)`` launches of a CUDA source into
calls of the CUDA-execution emulator (csrc/emu/idid_emu.h), so the file compiles as host C++:

    kernel<T><<<grid, block, 0, stream>>>(a, b)
 -> ::idid_emu::launch("kernel<T>", kernel<T>, grid, block, 0, stream)(a, b)

Everything else is left as it is; line breaks are kept, so compiler diagnostics point at the
original lines (a ``#line`` directive names the original file). Used by setup.py for the CPU build
and by the emulator's tests (which mutate kernels and rebuild them). Standard library only.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_:]*$")


def _kernel_start(src: str, end: int) -> int:
    """Start of the kernel expression ending at ``end`` (exclusive): an identifier, possibly
    qualified, with optional template arguments (balanced angle brackets)."""
    k = end
    if k > 0 and src[k - 1] == ">":
        depth = 0
        while k > 0:
            k -= 1
            if src[k] == ">":
                depth += 1
            elif src[k] == "<":
                depth -= 1
                if depth == 0:
                    break
        else:
            raise ValueError("unbalanced template arguments before <<<")
    m = _IDENT.search(src[:k])
    if m is None:
        raise ValueError(f"no kernel name before <<< near: {src[max(0, end - 60):end]!r}")
    return m.start()


def rewrite(src: str, origin: str = "") -> str:
    """The source with every launch rewritten; ``origin`` (the original path) goes into #line."""
    out: list[str] = []
    i = 0
    while True:
        j = src.find("<<<", i)
        if j < 0:
            break
        name_end = j
        while name_end > i and src[name_end - 1].isspace():
            name_end -= 1
        start = _kernel_start(src, name_end)
        if start < i:
            raise ValueError("overlapping launches")
        close = src.find(">>>", j + 3)
        if close < 0:
            raise ValueError(f"unterminated <<< at offset {j}")
        name = src[start:name_end]
        label = " ".join(name.split()).replace('"', "")
        out.append(src[i:start])
        out.append(f'::idid_emu::launch("{label}", {name}{src[name_end:j]}, {src[j + 3:close]})')
        i = close + 3
    out.append(src[i:])
    body = "".join(out)
    if "<<<" in body:
        raise ValueError("a launch was left unrewritten")
    header = f'#line 1 "{origin}"\n' if origin else ""
    return header + body


def rewrite_file(src_path: Path, dst_path: Path) -> bool:
    """Writes the rewritten ``src_path`` to ``dst_path`` when its content changed (so incremental
    builds stay incremental); returns whether it wrote."""
    text = rewrite(Path(src_path).read_text(), origin=str(src_path))
    dst = Path(dst_path)
    if dst.exists() and dst.read_text() == text:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return True


if __name__ == "__main__":  # python csrc/emu/launch_rewrite.py IN.cu OUT.cpp
    rewrite_file(Path(sys.argv[1]), Path(sys.argv[2]))
