"""conda environments: ``--conda ENV`` activates ENV before Jupyter starts.

Works with whichever the remote has: conda (also mamba 1.x installs, which
include conda), mamba 2.x or micromamba.  It is found through $CONDA_EXE,
$MAMBA_EXE, the login PATH, or the usual install places (~/miniforge3,
~/miniconda3, ~/anaconda3, ~/mambaforge, /opt/conda, ~/.local/bin/micromamba,
~/micromamba/bin/micromamba), since `conda init` often sets up only
interactive shells.  Activation is the documented one: the tool's shell hook,
then `conda activate ENV` (`micromamba activate ENV`).  ENV may be a name or a
path.  Under csh/tcsh only conda itself is supported (`conda shell.csh
activate`).  ENV travels as data in $NBT_CONDA, never as shell text.
"""

import nbtunnel

# Written once in POSIX sh and run by every shell family (as `sh -c 'eval "$NBT_CONDA_FIND"'`,
# a constant line): prints the path of the first conda-like tool found.
FIND = r"""
for x in "${CONDA_EXE:-}" "${MAMBA_EXE:-}" conda mamba micromamba \
    "$HOME/miniforge3/bin/conda" "$HOME/miniconda3/bin/conda" "$HOME/anaconda3/bin/conda" \
    "$HOME/mambaforge/bin/conda" /opt/conda/bin/conda "$HOME/.local/bin/micromamba" \
    "$HOME/micromamba/bin/micromamba"; do
    [ -n "$x" ] || continue
    case $x in
        */*) [ -x "$x" ] && { echo "$x"; exit 0; } ;;
        *) p=$(command -v "$x") && case $p in /*) echo "$p"; exit 0 ;; esac ;;
    esac
done
echo "nbtunnel: --conda: no conda, mamba or micromamba found on this host" >&2
exit 1
"""

# csh re-parses what stands inside backquotes, so ENV must not appear there:
# this sh script, piped to sh by a constant line, prints conda's csh activation
# code plus a marker of success.
CSH_ACTIVATE = r"""
x=$(eval "$NBT_CONDA_FIND") || exit 1
case ${x##*/} in
    conda) out=$("$x" shell.csh activate "$NBT_CONDA") &&
        printf '%s\nsetenv NBT_CONDA_OK 1;\n' "$out" ;;
    *) echo "nbtunnel: --conda under csh/tcsh needs conda itself, not ${x##*/}" >&2 ;;
esac
"""

SH = r"""nbt_exe=$(sh -c 'eval "$NBT_CONDA_FIND"') &&
case ${nbt_exe##*/} in
    conda) eval "$("$nbt_exe" shell.posix hook)" && conda activate "$NBT_CONDA" ;;
    *) eval "$("$nbt_exe" shell hook -s posix)" && "${nbt_exe##*/}" activate "$NBT_CONDA" ;;
esac"""

FISH = r"""set -l nbt_exe (sh -c 'eval "$NBT_CONDA_FIND"'); or exit 1
set -l nbt_name (string replace -r '.*/' '' -- $nbt_exe)
if test "$nbt_name" = conda
    $nbt_exe shell.fish hook | source; and conda activate $NBT_CONDA
else
    $nbt_exe shell hook -s fish | source; and $nbt_name activate $NBT_CONDA
end"""

CSH = r"""eval "`printenv NBT_CONDA_CSH | sh`"
test $?NBT_CONDA_OK = 1"""


class Conda(nbtunnel.ShellEnvironment):
    """--conda ENV: activate a conda/mamba/micromamba environment."""

    name = "conda"
    order = 40
    options = [nbtunnel.Option("--conda", "conda/mamba/micromamba environment to activate",
                               metavar="ENV")]

    def steps(self, args):
        """Find the tool, run its shell hook, activate ENV."""
        if not args.conda:
            return []
        return [dict(data={"NBT_CONDA": args.conda, "NBT_CONDA_FIND": FIND,
                           "NBT_CONDA_CSH": CSH_ACTIVATE},
                     fail="--conda: cannot activate the environment", show="NBT_CONDA",
                     sh=SH, fish=FISH, csh=CSH)]


nbtunnel.register(Conda())
