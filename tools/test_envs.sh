# The two test environments, sourced by .ci/run and tools/check_latest.sh:
#   main   Python 3.11, current libraries   requirements-dev.in   -> requirements-dev.txt   + requirements-nodeps.txt
#   webui  the WebUI v1.10.1's own: Python 3.10, torch 2.1.2, transformers 4.30.2, pydantic 1, ...
#                                           requirements-webui.in -> requirements-webui.txt + requirements-webui-nodeps.txt
# test_env NAME sets env_python, env_in, env_lock, env_nodeps (env_python empty: no such interpreter)
# and env_disk_gb, the disk one run of it needs (venv, plus test files of up to ~1 GB at a time).

find_python() {  # the first interpreter of version $1 (e.g. 3.10) that runs, else nothing
    local candidate
    for candidate in "python$1" "$(pyenv root 2>/dev/null)"/versions/"$1".*/bin/python"$1" \
                     /root/.pyenv/versions/"$1".*/bin/python"$1" /usr/bin/python"$1" /usr/local/bin/python"$1"; do
        if "$candidate" -c 'import venv' >/dev/null 2>&1; then
            command -v "$candidate"
            return
        fi
    done
}

test_env() {
    case "$1" in
        main)
            env_python=$(find_python 3.11); env_in=requirements-dev.in
            env_lock=requirements-dev.txt; env_nodeps=requirements-nodeps.txt; env_disk_gb=3 ;;
        webui)
            env_python=$(find_python 3.10); env_in=requirements-webui.in
            env_lock=requirements-webui.txt; env_nodeps=requirements-webui-nodeps.txt; env_disk_gb=7 ;;
        *)
            echo "unknown test environment '$1' (main or webui)" >&2
            return 2 ;;
    esac
}
