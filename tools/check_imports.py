"""Check that imports point the way DESIGN.md says; exit 1 listing every violation.

    router  (spindle_router)          never torch, transformers, triton, spindle_server, spindle_kernels
    scheduler bookkeeping             (spindle_router/scheduler/* except loop.py) also never grpc,
                                      protobuf stubs, aiohttp or the shard client: pure Python
    kernels (spindle_kernels)         never spindle_server, spindle_router
    server  (spindle_server)          never spindle_router

Every import statement counts, including ones inside functions (a lazy import still loads the module).
Relative imports are resolved against the file's package.

    python tools/check_imports.py [REPO_ROOT]
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# The I/O owner of the scheduler: the one module under scheduler/ allowed to talk to the shards.
SCHEDULER_IO_MODULES = {"loop.py"}


@dataclass(frozen=True)
class Rule:
    name: str
    root: str  # package directory, relative to the repository root
    forbidden: tuple[str, ...]  # module prefixes
    exclude: frozenset[str] = frozenset()  # file names under root the rule skips

    def applies_to(self, path: Path, repo: Path) -> bool:
        rel = path.relative_to(repo)
        return rel.is_relative_to(self.root) and path.name not in self.exclude


RULES = (
    Rule("router", "router/spindle_router",
         ("torch", "transformers", "triton", "spindle_server", "spindle_kernels")),
    Rule("scheduler bookkeeping", "router/spindle_router/scheduler",
         ("grpc", "spindle_proto", "aiohttp", "spindle_router.shards", "spindle_router.api"),
         frozenset(SCHEDULER_IO_MODULES)),
    Rule("kernels", "kernels/spindle_kernels", ("spindle_server", "spindle_router")),
    Rule("server", "server/spindle_server", ("spindle_router",)),
)


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    module: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule} must not import {self.module}"


def _package_of(path: Path, repo: Path) -> list[str]:
    """Dotted package of a file under <dist>/<package>/..., e.g. router/spindle_router/api/x.py -> spindle_router.api."""
    return list(path.relative_to(repo).parts[1:-1])


def imported_modules(path: Path, repo: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path, repo)
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # `from pkg import sub` may import the submodule pkg.sub
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def check(repo: Path) -> list[Violation]:
    violations: list[Violation] = []
    for rule in RULES:
        root = repo / rule.root
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            if not rule.applies_to(path, repo):
                continue
            seen: set[tuple[int, str]] = set()
            for line, module in imported_modules(path, repo):
                for prefix in rule.forbidden:
                    if _matches(module, prefix) and (line, prefix) not in seen:
                        seen.add((line, prefix))
                        violations.append(Violation(path.relative_to(repo), line, prefix, rule.name))
    return violations


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repo = Path(args[0]).resolve() if args else Path(__file__).resolve().parent.parent
    violations = check(repo)
    for v in violations:
        print(v)
    if violations:
        print(f"{len(violations)} import(s) against the dependency direction", file=sys.stderr)
        return 1
    print("imports point the right way")
    return 0


if __name__ == "__main__":
    sys.exit(main())
