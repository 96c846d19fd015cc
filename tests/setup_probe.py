"""Import setup.py's toolkit search without running setup() (for tests)."""
import ast
import os

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cuda_home():
    src = open(os.path.join(_REPO, "setup.py")).read()
    tree = ast.parse(src)
    wanted = {"_is_toolkit", "find_cuda_home"}
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted],
                        type_ignores=[])
    namespace = {"os": os, "shutil": __import__("shutil")}
    exec(compile(module, "setup.py", "exec"), namespace)
    return namespace["find_cuda_home"]()
