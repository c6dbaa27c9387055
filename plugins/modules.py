"""HPC environment modules: ``--module NAME`` (repeatable) runs `module load NAME`.

Works with Lmod and with environment-modules (Tcl), in sh-family shells,
fish and csh/tcsh.  When the login shell has not defined `module` (zsh, fish
and tcsh login files often do not), the plugin sources the init file for that
shell from $MODULESHOME or the usual install places first.  Names travel as
data in $NBT_MODULES_<i>, never as shell text.
"""

import nbtunnel

DIRS = ["/usr/share/modules", "/usr/share/Modules", "/usr/share/lmod/lmod",
        "/opt/lmod/lmod", "/usr/local/lmod/lmod", "/etc/modules"]

INIT_SH = r"""if ! command -v module >/dev/null 2>&1; then
    nbt_s=sh
    [ -n "${BASH_VERSION:-}" ] && nbt_s=bash
    [ -n "${ZSH_VERSION:-}" ] && nbt_s=zsh
    for nbt_d in "${MODULESHOME:-/nonexistent}" %s; do
        if [ -r "$nbt_d/init/$nbt_s" ]; then . "$nbt_d/init/$nbt_s"; break; fi
    done
fi""" % " ".join(DIRS)

INIT_FISH = r"""if not functions -q module
    for nbt_d in $MODULESHOME %s
        if test -r $nbt_d/init/fish
            source $nbt_d/init/fish
            break
        end
    end
end""" % " ".join(DIRS)

INIT_CSH = "\n".join(
    ['if ( $?MODULESHOME ) then',
     'if ( "`alias module`" == "" && -r "$MODULESHOME/init/tcsh" ) source "$MODULESHOME/init/tcsh"',
     'endif'] +
    ['if ( "`alias module`" == "" && -r %s/init/tcsh ) source %s/init/tcsh' % (d, d) for d in DIRS])

class Modules(nbtunnel.ShellEnvironment):
    """--module NAME: `module load NAME` for each, in order."""

    name = "modules"
    order = 30
    options = [nbtunnel.Option("--module", "module load NAME (Lmod, environment-modules); "
                               "repeatable", metavar="NAME", multiple=True)]

    def steps(self, args):
        """Define `module` if needed, then load each module; a failed load fails the start."""
        if not args.module:
            return []
        steps = [dict(sh=INIT_SH, fish=INIT_FISH, csh=INIT_CSH)]
        for i, name in enumerate(args.module):
            var = "NBT_MODULES_%d" % i
            steps.append(dict(data={var: name}, fail="module load failed", show=var,
                              sh='module load "$%s"' % var, fish="module load $%s" % var,
                              csh="module load $%s:q" % var))
        return steps


nbtunnel.register(Modules())
