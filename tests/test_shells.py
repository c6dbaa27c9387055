"""Shell environment plugins (--rc, --setup, --module, --conda) under every login shell.

The remote user's login shell is switched to bash, zsh, tcsh and fish in turn;
Jupyter must start from it with every plugin applied, and the kernel must see
what they set.  Hostile names and paths must stay data.  There is no real conda
here (only PyPI and Debian are reachable, and neither ships a working conda or
micromamba): --conda is tested against small stand-ins for `conda` and
`micromamba` that speak the same shell protocol (`conda shell.posix hook`,
`shell.fish hook`, `shell.<shell> activate ENV`; `micromamba shell hook -s SHELL`).
--module uses Debian's real environment-modules.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from helpers import local_ssh_pids, run_kernel_code

SHELLS = {
    "bash": "/bin/bash",
    "zsh": "/usr/bin/zsh",
    "tcsh": "/usr/bin/tcsh",
    "fish": "/usr/bin/fish",
}
LOGIN_FILES = {"bash": ".profile", "zsh": ".zprofile", "tcsh": ".login", "fish": ".config/fish/config.fish"}
HOSTILE = ["$(touch PWNED)", "`touch PWNED`", "a;touch PWNED", "q'u\"o te", "new\nline touch PWNED", "-x $HOME *"]

# A stand-in for conda and micromamba: the activation protocol of the real ones, nothing else.
# As conda: `shell.posix hook`, `shell.fish hook`, `shell.<shell> activate ENV`; as micromamba:
# `shell hook -s posix|fish`, `shell activate -s posix|fish ENV`.  Envs live in ROOT/envs.
FAKE_CONDA = r"""#!/usr/bin/python3
import os, shlex, sys
me = os.path.abspath(__file__)
name = os.path.basename(me)
root = os.environ.get("NBTEST_MAMBA_ROOT", "") if name != "conda" else os.path.dirname(os.path.dirname(me))
args = sys.argv[1:]
var = "CONDA_EXE" if name == "conda" else "MAMBA_EXE"

def prefix(env):
    path = env if "/" in env else os.path.join(root, "envs", env)
    if not os.path.isdir(path):
        sys.stderr.write("EnvironmentNameNotFound: Could not find conda environment: %s\n" % env)
        sys.exit(1)
    return path

def fishq(v):
    return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"

def hook(shell):
    if shell == "posix":
        print("export %s=%s" % (var, shlex.quote(me)))
        print('%s() { if [ "$1" = activate ]; then nbt_c=$("$%s" %s "$2") || return 1; eval "$nbt_c"; '
              'else "$%s" "$@"; fi; }' % (name, var, "shell.posix activate" if name == "conda"
                                          else "shell activate -s posix", var))
    else:
        print("set -gx %s %s" % (var, fishq(me)))
        print('function %s; if test "$argv[1]" = activate; set -l c ($%s %s $argv[2]); or return 1; '
              'string join \\n $c | source; else; $%s $argv; end; end'
              % (name, var, "shell.fish activate" if name == "conda" else "shell activate -s fish", var))

def activate(shell, env):
    p = prefix(env)
    new = dict(CONDA_PREFIX=p, CONDA_DEFAULT_ENV=env, PATH=os.path.join(p, "bin") + ":" + os.environ["PATH"])
    for k, v in sorted(new.items()):
        if shell == "posix":
            print("export %s=%s" % (k, shlex.quote(v)))
        elif shell == "fish":
            print("set -gx %s %s;" % (k, fishq(v)))
        elif shell == "csh":
            print("setenv %s '%s';" % (k, v))

if name == "conda" and len(args) == 2 and args[0] in ("shell.posix", "shell.fish") and args[1] == "hook":
    hook(args[0][6:])
elif name == "conda" and len(args) == 3 and args[0].startswith("shell.") and args[1] == "activate":
    activate(args[0][6:], args[2])
elif name != "conda" and args[:3] in (["shell", "hook", "-s"],) and args[3] in ("posix", "fish"):
    hook(args[3])
elif name != "conda" and args[:3] == ["shell", "activate", "-s"] and len(args) == 5:
    activate(args[3], args[4])
else:
    sys.stderr.write("fake %s: unsupported %r\n" % (name, args))
    sys.exit(2)
"""

MODULEFILE = """#%Module1.0
setenv NBTEST_MODULE loaded
prepend-path PATH {home}/modbin
"""

RC = {  # an rc file in each shell's own syntax
    "bash": "export NBTEST_RC=sourced\n",
    "zsh": "export NBTEST_RC=sourced\n",
    "tcsh": "setenv NBTEST_RC sourced\n",
    "fish": "set -gx NBTEST_RC sourced\n",
}
SETUP = {
    "bash": 'export NBTEST_SETUP="$CONDA_DEFAULT_ENV+$NBTEST_MODULE"',
    "zsh": 'export NBTEST_SETUP="$CONDA_DEFAULT_ENV+$NBTEST_MODULE"',
    "tcsh": 'setenv NBTEST_SETUP "${CONDA_DEFAULT_ENV}+${NBTEST_MODULE}"',
    "fish": 'set -gx NBTEST_SETUP "$CONDA_DEFAULT_ENV+$NBTEST_MODULE"',
}
MODULEPATH = {
    "bash": 'export MODULEPATH="$HOME/modulefiles"\n',
    "zsh": 'export MODULEPATH="$HOME/modulefiles"\n',
    "tcsh": 'setenv MODULEPATH "$HOME/modulefiles"\n',
    "fish": "set -gx MODULEPATH $HOME/modulefiles\n",
}
RC_NAME = "rc dir/it's $(touch PWNED) `x`;.rc"
KERNEL_CODE = (
    "import os, shutil; print(repr({k: os.environ.get(k) for k in "
    "('NBTEST_RC', 'NBTEST_MODULE', 'CONDA_DEFAULT_ENV', 'NBTEST_SETUP')}), "
    "shutil.which('nbt-modtool'), shutil.which('nbt-envtool'), end='')"
)


def put(remote, relative: str, text: str, mode: str = "644") -> None:
    """Write a file in the remote home as the remote user."""
    path = str(remote.home / relative)
    remote.run(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"', "sh", path, mode],
               input=text, check=True)


@pytest.fixture(scope="module")
def home(remote):
    """A modulefile, a fake conda with one environment, and MODULEPATH in every login file."""
    if not Path("/usr/share/modules/init/sh").exists():
        pytest.skip("environment-modules is not installed: run bash tests/run")
    put(remote, "modulefiles/nbtest/1.0", MODULEFILE.format(home=remote.home))
    put(remote, "modbin/nbt-modtool", "#!/bin/sh\necho mod\n", "755")
    put(remote, "miniconda3/bin/conda", FAKE_CONDA, "755")
    put(remote, "miniconda3/envs/nbenv/bin/nbt-envtool", "#!/bin/sh\necho env\n", "755")
    for shell, text in MODULEPATH.items():
        put(remote, LOGIN_FILES[shell], remote.run(["cat", str(remote.home / LOGIN_FILES[shell])]).stdout + text)
    for shell, text in RC.items():
        put(remote, f"rcs/{shell}/{RC_NAME}", text)
    return remote


def pwned(remote) -> bool:
    return bool(list(remote.home.rglob("PWNED")))


@pytest.mark.parametrize("shell", list(SHELLS))
def test_every_plugin_under_every_login_shell(nbt, home, shell):
    remote = home
    with remote.login_shell(SHELLS[shell]):
        proc = nbt.run(remote.alias, "--json", "--rc", f"~/rcs/{shell}/{RC_NAME}", "--module", "nbtest/1.0",
                       "--conda", "nbenv", "--setup", SETUP[shell], "-v")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["environment"] == ["rc", "modules", "conda", "setup"]
    assert "environment: rc (built-in), modules (" in proc.stderr
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"], KERNEL_CODE)
    env = {"NBTEST_RC": "sourced", "NBTEST_MODULE": "loaded", "CONDA_DEFAULT_ENV": "nbenv",
           "NBTEST_SETUP": "nbenv+loaded"}
    assert out == f"{env!r} {remote.home}/modbin/nbt-modtool {remote.home}/miniconda3/envs/nbenv/bin/nbt-envtool"
    assert not pwned(remote)


@pytest.mark.parametrize("shell", list(SHELLS))
def test_login_shell_alone_and_failures_are_clear(nbt, home, shell):
    remote = home
    with remote.login_shell(SHELLS[shell]):
        for manager in ("screen", "nohup"):  # tmux runs under every shell in the test above
            plain = nbt.run(remote.alias, "--json", "--manager", manager)
            assert plain.returncode == 0, plain.stderr
            info = json.loads(plain.stdout)
            assert info["environment"] == [] and info["manager"] == manager
            out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"], "1+1")
            assert out == "2"
            assert nbt.run("--terminate").returncode == 0
            remote.run(["screen", "-wipe"])  # forget screens killed by earlier tests
            assert not remote.pids(r"jupyter") and remote.screen_sessions() == []
        cases = [
            (["--rc", name], "cannot read the --rc file") for name in HOSTILE
        ] + [
            (["--module", name], "module load") for name in HOSTILE
        ] + [
            (["--conda", name], "cannot activate the environment") for name in HOSTILE
        ] + [(["--setup", "false"], "the --setup command failed")]
        for args, message in cases:
            proc = nbt.run(remote.alias, *args)
            assert proc.returncode == 1, (args, proc.stderr)
            assert message in proc.stderr and "login shell" in proc.stderr, (args, proc.stderr)
            if shell != "tcsh" and args[0] != "--setup":  # csh messages leave the value out
                assert args[1].splitlines()[0] in proc.stderr, (args, proc.stderr)
            assert not pwned(remote), args
    assert not remote.pids(r"jupyter") and remote.tmux_sessions() == []
    assert not local_ssh_pids(str(nbt.ssh_config))


def test_conda_missing_and_path_env(nbt, home):
    remote = home
    env_path = str(remote.home / "miniconda3/envs/nbenv")
    info = json.loads(nbt.run(remote.alias, "--json", "--conda", env_path).stdout)
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"],
                          "import os; print(os.environ['CONDA_PREFIX'], end='')")
    assert out == env_path
    assert nbt.run("--terminate").returncode == 0
    remote.run(["mv", str(remote.home / "miniconda3"), str(remote.home / "moved-conda")], check=True)
    try:
        proc = nbt.run(remote.alias, "--conda", "nbenv")
    finally:
        remote.run(["mv", str(remote.home / "moved-conda"), str(remote.home / "miniconda3")], check=True)
    assert proc.returncode == 1 and "no conda, mamba or micromamba found" in proc.stderr


def test_config_file_keys_for_plugin_options(nbt, home, tmp_path):
    remote = home
    config = tmp_path / "config.ini"
    config.write_text(textwrap.dedent(f"""\
        [host {remote.alias}]
        module = nbtest/1.0
        conda = nbenv
        setup = export NBTEST_SETUP=fromconfig
        """))
    proc = nbt.run(remote.alias, "--json", env={"NBTUNNEL_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["environment"] == ["modules", "conda", "setup"]
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"],
                          "import os; print(os.environ['NBTEST_MODULE'], os.environ['NBTEST_SETUP'], end='')")
    assert out == "loaded fromconfig"


def readme_plugin() -> str:
    text = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    section = text.split("## Writing a plugin", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("shell", ["bash", "fish", "tcsh"])
def test_readme_plugin_works(nbt, remote, tmp_path, shell):
    code = readme_plugin()
    assert 12 <= len([line for line in code.splitlines() if line.strip()]) <= 20
    plugin = tmp_path / "venv.py"
    plugin.write_text(code)
    with remote.login_shell(SHELLS[shell]):
        proc = nbt.run(remote.alias, "--json", "--plugin", str(plugin), "--venv", str(remote.jupyter_venv))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["environment"] == ["venv"]
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"],
                          "import os; print(os.environ.get('VIRTUAL_ENV'), end='')")
    assert out == str(remote.jupyter_venv)


@pytest.mark.parametrize("shell", list(SHELLS))
def test_conda_plugin_with_micromamba(nbt, home, shell):
    """Only micromamba on the host (its stand-in): sh and fish activate, csh says it needs conda."""
    remote = home
    put(remote, ".local/bin/micromamba", FAKE_CONDA, "755")
    put(remote, "micromamba/envs/mbenv/bin/nbt-envtool", "#!/bin/sh\necho env\n", "755")
    root_line = {"bash": 'export NBTEST_MAMBA_ROOT="$HOME/micromamba"\n',
                 "zsh": 'export NBTEST_MAMBA_ROOT="$HOME/micromamba"\n',
                 "tcsh": 'setenv NBTEST_MAMBA_ROOT "$HOME/micromamba"\n',
                 "fish": "set -gx NBTEST_MAMBA_ROOT $HOME/micromamba\n"}[shell]
    rc = f"rcs/{shell}/mamba-root"
    put(remote, rc, root_line)
    remote.run(["mv", str(remote.home / "miniconda3"), str(remote.home / "moved-conda")], check=True)
    try:
        with remote.login_shell(SHELLS[shell]):
            proc = nbt.run(remote.alias, "--json", "--rc", "~/" + rc, "--conda", "mbenv")
    finally:
        remote.run(["mv", str(remote.home / "moved-conda"), str(remote.home / "miniconda3")], check=True)
        remote.run(["rm", "-f", str(remote.home / ".local/bin/micromamba")], check=True)
    if shell == "tcsh":
        assert proc.returncode == 1 and "needs conda itself, not micromamba" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    code = "import os, shutil; print(os.environ['CONDA_DEFAULT_ENV'], shutil.which('nbt-envtool'), end='')"
    out = run_kernel_code(f"http://127.0.0.1:{info['local_port']}", info["token"], code)
    assert out == f"mbenv {remote.home}/micromamba/envs/mbenv/bin/nbt-envtool"
