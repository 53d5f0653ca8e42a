"""The sandbox's launcher, init and sample: the part of sandbox.py that runs in the sandboxed interpreter.

sandbox.py starts this file's text as `python -I -S -B -c <text>` (as a throwaway uid when root), with the job on
stdin. Stdlib only, and only cheap modules: importing json, signal or contextlib here would cost more than a small
sample's whole run. The launcher unshares user, mount, network, IPC, PID and UTS namespaces and forks the init
(pid 1 inside). The init builds the filesystem view, then forks the sample, which drops every privilege before any
generated code runs. The init then runs the tests, or waits for a program, and reports over a pipe the sample never
held. See sandbox.py for the guarantees and their limits.
"""
import _signal as signal  # signal's enum wrappers cost ~8 ms of import per sample
import marshal
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 4, 24, 38, 47
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
READ_ONLY_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/nix/store")
DEVICES = ("null", "zero", "full", "random", "urandom")
SAMPLE_UID = 1000  # the sample's uid inside its nested user namespace: not 0, so an execve never regains caps
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # a candidate's return value, encoded: what the checker reads at most
CHECKER_MEMORY_BYTES = 1024 * 1024 * 1024  # RLIMIT_AS of the trusted checker: decoding a reply stays bounded
KEYCTL_JOIN_SESSION_KEYRING = 1
# Per-user-namespace counts (/proc/sys/user) the init sets in its namespace, which bound every namespace below it:
# the sample may create its own user namespace (1) and nothing else, so no nested IPC, mount or tmpfs escapes the
# caps; no inotify either (it would watch the host's read-only folders).
NAMESPACE_COUNTS = {"max_user_namespaces": 1, "max_ipc_namespaces": 0, "max_mnt_namespaces": 0,
                    "max_net_namespaces": 0, "max_pid_namespaces": 0, "max_uts_namespaces": 0,
                    "max_cgroup_namespaces": 0, "max_time_namespaces": 0, "max_inotify_instances": 0,
                    "max_fanotify_groups": 0}

# seccomp: the sample's system calls that reach past its namespaces or its caps. Numbers per architecture (they
# differ); on any other architecture the layer is refused by name, never guessed.
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALLS = {  # name: (x86_64, aarch64)
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),  # keyrings are not namespaced
    "unshare": (272, 97), "setns": (308, 268),  # nested namespaces: a fresh IPC/mount ns escapes the caps
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442),
    "memfd_create": (319, 279), "memfd_secret": (447, 447),  # memory that RLIMIT_AS does not see
    "fallocate": (285, 47),  # preallocation through an inherited fd: disk that RLIMIT_FSIZE does not see
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "process_madvise": (440, 440), "pidfd_getfd": (438, 438), "kcmp": (312, 272),
    "move_pages": (279, 239), "migrate_pages": (256, 238),
    "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "inotify_init": (253, None), "inotify_init1": (294, 26), "fanotify_init": (300, 262),  # host file events
    "flock": (73, 32),  # advisory locks on the host files it can read
}
ARG_SYSCALLS = {"clone": (56, 220), "clone3": (435, 435), "socket": (41, 198), "fcntl": (72, 25)}
# Calls that may only aim at the sample itself (0 in the argument that names the target): its checker shares its
# uid outside, so the kernel would let it lower the checker's limits or priority.
SELF_ONLY = {"prlimit64": ((302, 261), 0), "setpriority": ((141, 140), 1), "ioprio_set": ((251, 30), 1),
             "sched_setaffinity": ((203, 122), 0), "sched_setscheduler": ((144, 119), 0),
             "sched_setparam": ((142, 118), 0), "sched_setattr": ((314, 274), 0)}
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
AF_VSOCK = 40  # vsock is not network-namespaced: it reaches the hypervisor and other guests
LOCK_COMMANDS = (5, 6, 7, 36, 37, 38, 1024, 1025, 1026)  # F_[OFD_]GETLK/SETLK/SETLKW, leases, dnotify
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
ATOM_TAGS = {int: b"i", float: b"f", bytes: b"b", str: b"s", complex: b"c"}
CONTAINER_TAGS = {list: b"l", tuple: b"t", set: b"S", frozenset: b"z", dict: b"d"}


def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)


def _call(result, what):
    import ctypes
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _prctl(option, value):
    import ctypes
    _call(_libc().prctl(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0),
                        ctypes.c_ulong(0)), f"prctl({option})")


def _mount(source, target, fstype, flags, data=None):
    import ctypes
    enc = (lambda s: None if s is None else s.encode())
    _call(_libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def _unshare_user(flags, inside):
    """Enter a new user namespace (plus `flags`) and map our uid/gid to `inside`: the one mapping anyone may write."""
    uid, gid = os.geteuid(), os.getegid()  # before: inside an unmapped namespace they read as 65534
    _call(_libc().unshare(CLONE_NEWUSER | flags), "unshare")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inside} {uid} 1"), ("gid_map", f"{inside} {gid} 1")):
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        except OSError as e:
            raise OSError(e.errno, f"writing /proc/self/{name}: {e.strerror}") from None


def seccomp_program(machine):
    """The sample's seccomp filter as BPF bytes for this architecture, or None where the numbers are unknown."""
    if machine not in AUDIT_ARCH:
        return None
    column = ("x86_64", "aarch64").index(machine)
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS

    def errno(code):
        return 0x00050000 | code  # SECCOMP_RET_ERRNO

    def op(code, k, jt=0, jf=0):
        return code.to_bytes(2, sys.byteorder) + bytes((jt, jf)) + k.to_bytes(4, sys.byteorder)

    load, ret, jeq, jge, jset = 0x20, 0x06, 0x15, 0x35, 0x45

    def arg(i):  # offset of the low 32 bits of argument i in struct seccomp_data (little-endian machines)
        return 16 + 8 * i

    nr = {name: numbers[column] for name, numbers in {**SYSCALLS, **ARG_SYSCALLS}.items()}
    code = [op(load, 4), op(jeq, AUDIT_ARCH[machine], 1, 0), op(ret, kill),  # i386/compat calls: another table
            op(load, 0)]
    if machine == "x86_64":  # the x32 ABI: same arch, numbers offset by 0x40000000
        code += [op(jge, 0x40000000, 0, 1), op(ret, errno(ENOSYS))]
    for name in SYSCALLS:
        if nr[name] is not None:
            code += [op(jeq, nr[name], 0, 1), op(ret, errno(EPERM))]
    code += [op(jeq, nr["clone3"], 0, 1), op(ret, errno(ENOSYS))]  # its flags sit in memory: make libc use clone
    code += [op(jeq, nr["clone"], 0, 4), op(load, arg(0)), op(jset, NAMESPACE_FLAGS, 0, 1), op(ret, errno(EPERM)),
             op(ret, allow)]
    code += [op(jeq, nr["socket"], 0, 4), op(load, arg(0)), op(jeq, AF_VSOCK, 0, 1),
             op(ret, errno(EAFNOSUPPORT)), op(ret, allow)]
    for numbers, index in SELF_ONLY.values():
        code += [op(jeq, numbers[column], 0, 4), op(load, arg(index)), op(jeq, 0, 1, 0), op(ret, errno(EPERM)),
                 op(ret, allow)]
    n = len(LOCK_COMMANDS)
    code += [op(jeq, nr["fcntl"], 0, n + 3), op(load, arg(1))]
    code += [op(jeq, command, n - i, 0) for i, command in enumerate(LOCK_COMMANDS)]
    code += [op(ret, allow), op(ret, errno(EPERM))]
    code += [op(ret, allow)]
    return b"".join(code)


def _install_seccomp(program):
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _call(_libc().prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0),
                        ctypes.c_ulong(0)), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _remount_read_only(prefixes):
    """Remount every mount at or under these paths read-only, keeping the flags the kernel locks (nosuid...)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in points:
        if not any(point == p or point.startswith(p + "/") for p in prefixes):
            continue
        flags = os.statvfs(point).f_flag
        kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
        kept |= MS_RELATIME if flags & 4096 else 0  # ST_RELATIME is 4096, MS_RELATIME 1 << 21
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def _build_root(config):
    """In the new mount namespace: a tmpfs root with read-only system folders, a private /proc, then pivot.
    Returns {layer: None if it holds, else why not} for the layers that can fail here."""
    new = "/tmp"  # any existing folder works as the mount point; the host's /tmp is covered, never used
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    _mount("sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV, f"size={config['scratch_bytes']},nr_inodes=4096,mode=755")
    binds = [p for p in dict.fromkeys(READ_ONLY_BINDS + tuple(config["interpreter_dirs"])) if os.path.lexists(p)]
    folders = [p for p in binds if os.path.isdir(p) and not os.path.islink(p)]
    read_only = []
    for path in binds:
        target = new + path
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
        elif path in folders and not any(path.startswith(f + "/") for f in folders):  # else inside another bind
            os.makedirs(target, exist_ok=True)
            _mount(path, target, None, MS_BIND | MS_REC)
            read_only.append(target)
    os.makedirs(new + "/dev/shm")
    for name in DEVICES:  # the host's nodes, read-only: writes still work, touch/chmod of the host node do not
        open(f"{new}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{new}/dev/{name}", None, MS_BIND)
        read_only.append(f"{new}/dev/{name}")
    _remount_read_only(read_only)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    for path in ("/tmp", "/var/tmp", "/run/lock", "/dev/shm"):
        os.makedirs(new + path, exist_ok=True)
        os.chmod(new + path, 0o1777)
    os.makedirs(new + config["workdir"], exist_ok=True)
    os.makedirs(new + "/proc")
    layers = {}
    # hidepid: the checker (pid 1, not dumpable) vanishes from the sample's /proc, and so do its writable files
    for options in ("hidepid=invisible", "hidepid=2", None):
        try:
            _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, options)
            layers["hidden_checker"] = None if options else f"proc refused hidepid ({refused})"
            layers["private_proc"] = None
            break
        except OSError as e:  # some containers mask parts of /proc, and the kernel then refuses a fresh one
            refused = e.strerror
    else:
        layers["private_proc"] = layers["hidden_checker"] = f"no /proc inside the sandbox ({refused})"
    os.makedirs(new + "/.old_root")
    number = SYS_PIVOT_ROOT.get(os.uname().machine)
    try:
        if number is None:
            raise OSError(38, "pivot_root: unknown syscall number")
        _call(_libc().syscall(number, new.encode(), (new + "/.old_root").encode()), "pivot_root")
        os.chdir("/")
        _call(_libc().umount2(b"/.old_root", 2), "umount old root")  # MNT_DETACH
        os.rmdir("/.old_root")
    except OSError:  # an initramfs root cannot be pivoted: move the tmpfs over / and chroot into it
        os.chdir(new)
        _mount(new, "/", None, MS_MOVE)
        os.chroot(".")
        os.chdir("/")
    limits = {"kernel/shmmax": config["scratch_bytes"], "kernel/shmall": config["scratch_bytes"] // 4096,
              "kernel/shmmni": 16, "kernel/msgmni": 16}
    limits.update({f"user/{name}": value for name, value in NAMESPACE_COUNTS.items()})
    failed = []
    for name, value in limits.items():
        try:
            with open(f"/proc/sys/{name}", "w") as f:
                f.write(str(value))
        except OSError as e:
            if not (e.errno == 2 and name.startswith("user/max_") and name != "user/max_user_namespaces"):
                failed.append(f"{name} ({e.strerror})")  # a count this kernel lacks is a feature it lacks
    layers["ipc_limits"] = next((f"not set: {f}" for f in failed if f.startswith("kernel/")), None)
    layers["no_nested_namespaces"] = next((f"not set: {f}" for f in failed if f.startswith("user/")), None)
    try:  # the namespace's root (our uid outside) owns the IPC and net sysctls: the sample shares that uid
        _mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
        _mount(None, "/proc/sys", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        layers["read_only_sysctls"] = None
    except OSError as e:
        layers["read_only_sysctls"] = e.strerror
    _libc().sethostname(b"sandbox", 7)  # cosmetic: failure is harmless
    return layers


def _drop_privileges():
    """The sample: a nested user namespace whose only uid is not 0, no capabilities, no way to gain any."""
    import ctypes
    _prctl(PR_SET_DUMPABLE, 1)  # our /proc/self files must be ours to write the uid map
    _unshare_user(0, SAMPLE_UID)
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break
    _libc().prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # clear the ambient set (EINVAL before Linux 4.3: none to clear)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    _call(_libc().capset(header, data), "capset")


def pack(value, out, depth=0):
    """Append `value` to bytearray `out`. Plain values only, as exact builtin types: a subclass with its own
    __eq__ cannot pass a test. Format: a tag byte, then "<length>:<bytes>" or "<count>:" and the items."""
    kind = type(value)
    if depth > 100:
        raise ValueError("value nested too deeply")
    if value is None or kind is bool:
        out += {None: b"N", True: b"T", False: b"F"}[value]
    elif kind in ATOM_TAGS:
        data = {int: lambda v: str(v).encode(), float: lambda v: v.hex().encode(), bytes: bytes,
                str: lambda v: v.encode("utf-8", "surrogatepass"),
                complex: lambda v: f"{v.real.hex()} {v.imag.hex()}".encode()}[kind](value)
        out += ATOM_TAGS[kind] + str(len(data)).encode() + b":" + data
    elif kind in CONTAINER_TAGS:
        out += CONTAINER_TAGS[kind] + str(len(value)).encode() + b":"
        for item in (value.items() if kind is dict else value):
            for part in (item if kind is dict else (item,)):
                pack(part, out, depth + 1)
    else:
        raise TypeError(f"cannot pass a {kind.__name__} between the sample and its tests")
    return out


def unpack(data, at=0, depth=0):
    """The checker's decoder of what the sample sent: (value, next offset); builds exact builtin types only."""
    if depth > 100:
        raise ValueError("value nested too deeply")
    tag = data[at:at + 1]
    if tag in (b"N", b"T", b"F"):
        return {b"N": None, b"T": True, b"F": False}[tag], at + 1
    colon = data.index(b":", at + 1)
    size = int(data[at + 1:colon].decode("ascii"))
    at = colon + 1
    if size < 0 or size > len(data):
        raise ValueError("bad length in the sample's reply")
    if tag in b"ifbsc" and len(tag) == 1:
        chunk = data[at:at + size]
        value = {b"i": lambda c: int(c.decode("ascii")), b"f": lambda c: float.fromhex(c.decode("ascii")),
                 b"b": bytes, b"s": lambda c: c.decode("utf-8", "surrogatepass"),
                 b"c": lambda c: complex(*map(float.fromhex, c.decode("ascii").split()))}[tag](chunk)
        return value, at + size
    items = []
    for _ in range(2 * size if tag == b"d" else size):
        item, at = unpack(data, at, depth + 1)
        items.append(item)
    if tag == b"d":
        return dict(zip(items[::2], items[1::2])), at
    return {b"l": list, b"t": tuple, b"S": set, b"z": frozenset}[tag](items), at


def decode(data):
    value, end = unpack(data)
    if end != len(data):
        raise ValueError("trailing bytes in the sample's reply")
    return value


def send_message(fd, data):
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive_message(fd, limit=MAX_MESSAGE_BYTES):
    """One length-prefixed message, or None at end of file."""
    def exactly(n):
        chunks = []
        while n:
            chunk = os.read(fd, min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)
    try:
        size = int.from_bytes(exactly(4), "big")
    except EOFError:
        return None
    if size > limit:
        raise ValueError(f"a message over {limit} bytes")
    return exactly(size)


def _become_sample(config, keep):
    """In the forked sample, before any generated code: drop what the trusted side holds, then lock the limits."""
    import builtins
    import resource
    if config["namespaces"]:
        _drop_privileges()
        os.setsid()  # kill(0) and F_SETOWN now reach its own group, not the launcher's (outside its PID namespace)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.chdir(config["workdir"])
    for new_fd, fd in enumerate(keep, start=3):
        os.dup2(fd, 10 + new_fd)  # two steps so that the pipes may sit anywhere, even on 3 or 4
    for new_fd in range(3, 3 + len(keep)):
        os.dup2(10 + new_fd, new_fd)
    os.close(0)
    os.closerange(3 + len(keep), 1 << 16)  # the verdict and test pipes, and anything else inherited
    for name, value in config["rlimits"]:
        resource.setrlimit(getattr(resource, name), (value, value))
    if config["seccomp"]:  # last: the steps above need unshare and prlimit
        _install_seccomp(config["seccomp"])
    builtins.exit = builtins.quit = sys.exit  # -S skipped site, which defines them


def _run_program(source):
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "sandboxed_program"})
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (e.code is not None)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback  # only now: importing it costs more than a small sample's whole run
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os._exit(code)


def _serve_candidate(config, requests, replies):
    """The sample's side of run_humaneval: define prompt + completion, then answer calls of the entry point."""
    namespace = {"__name__": "sandboxed_program"}
    try:
        exec(compile(config["prompt"] + config["completion"] + "\n", "program.py", "exec"), namespace)
        candidate = namespace[config["entry_point"]]
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    while True:
        request = receive_message(requests)
        if request is None:
            os._exit(0)
        try:
            reply = b"v" + pack(candidate(*decode(request)), bytearray())
        except BaseException as e:
            reply = b"e" + f"{type(e).__name__}: {e}"[:300].encode("utf-8", "replace")
        try:
            sys.stdout.flush()
        except Exception:
            pass
        send_message(replies, reply)


def _status(raw):
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _check(config, report):
    """The trusted side: fork the sample, then either wait for it (a program) or run the tests against it."""
    import resource
    humaneval = config["kind"] == "humaneval"
    cap = max(CHECKER_MEMORY_BYTES, 2 * config["memory_bytes"])  # the sample lowers its own to memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # what the checker decodes from a reply stays bounded
    to_sample, from_sample = (os.pipe(), os.pipe()) if humaneval else ((None, None), (None, None))
    pid = os.fork()
    if pid == 0:
        try:
            _become_sample(config, [to_sample[0], from_sample[1]] if humaneval else [])
        except BaseException as e:
            os.write(2, f"sandbox: could not prepare the sample: {e}\n".encode())
            os._exit(125)
        if humaneval:
            _serve_candidate(config, 3, 4)
        _run_program(config["source"])
    if not humaneval:
        returncode = _status(os.waitpid(pid, 0)[1])
        report(passed=returncode == 0, returncode=returncode, reason=None)
        return
    os.close(to_sample[0])
    os.close(from_sample[1])
    with os.fdopen(config["test_fd"], "rb") as f:  # only now: the sample's memory never held the tests
        test = f.read().decode()

    class CandidateError(Exception):
        pass

    def candidate(*args):
        try:
            send_message(to_sample[1], pack(list(args), bytearray()))
            reply = receive_message(from_sample[0])
        except (EOFError, BrokenPipeError):
            reply = None
        if reply is None:
            raise CandidateError("the program ended before its tests finished")
        if reply[:1] != b"v":
            raise CandidateError(reply[1:].decode("utf-8", "replace"))
        return decode(reply[1:])

    namespace = {"__name__": "__checker__"}
    try:
        exec(compile(config["prompt"] + "\n" + test + "\n", "tests.py", "exec"), namespace)
        namespace[config["entry_point"]] = candidate  # some tests call it by name (HumanEval/33)
        namespace["check"](candidate)
        passed, reason = True, None
    except BaseException as e:  # the tests' own failure, or a value the sample sent that we cannot decode
        passed, reason = False, f"{type(e).__name__}: {e}".rstrip(": ")[:300]
    os.kill(pid, signal.SIGKILL)
    report(passed=passed, returncode=_status(os.waitpid(pid, 0)[1]), reason=reason)


def _launcher_main():
    config = marshal.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # keeps fd 0 taken until the sample closes it
    os.close(null)
    sys.stdin = None
    verdict_fd = config["verdict_fd"]

    def report(**fields):
        send_message(verdict_fd, marshal.dumps(fields))

    os.environ.clear()
    os.environ.update(config["env"])
    keyctl = SYSCALLS["keyctl"][("x86_64", "aarch64").index(os.uname().machine)] if config["seccomp"] else None
    if keyctl is not None and _libc().syscall(keyctl, KEYCTL_JOIN_SESSION_KEYRING, None) < 0:
        report(layers={"fresh_session_keyring": "keyctl refused"})  # the caller's keys stay out of reach anyway
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # pid 1 ignores signals it has no handler for: keep it so
    child = None

    def on_timeout(*_):
        report(timed_out=True)
        if child:
            os.kill(child, signal.SIGKILL)
        raise TimeoutError
    signal.signal(signal.SIGALRM, on_timeout)
    if config["namespaces"]:
        try:
            _unshare_user(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWUTS, 0)
        except OSError as e:
            report(setup_error=str(e))
            return 3
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/mem or fd: the checker's memory is its own
    signal.setitimer(signal.ITIMER_REAL, config["timeout_sec"])
    if not config["namespaces"]:
        os.chdir(config["workdir"])
        try:
            _check(config, report)
        except TimeoutError:
            pass
        signal.setitimer(signal.ITIMER_REAL, 0)
        report(done=True)
        return 0
    child = os.fork()
    if child == 0:  # pid 1 of the new PID namespace: when it exits, everything in it dies
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            report(layers=_build_root(config))
            _check(config, report)
        except BaseException as e:
            report(setup_error=f"{type(e).__name__}: {e}")
            os._exit(3)
        os._exit(0)
    while True:
        try:
            os.waitpid(child, 0)
            break
        except TimeoutError:
            continue  # killed it; wait for the namespace to be torn down
    # Init reaped: the PID namespace and every process of the sample are gone. What is left, freeing the mounts
    # and the network namespace as we exit, takes the kernel ~20 ms (RCU grace periods); nobody need wait.
    signal.setitimer(signal.ITIMER_REAL, 0)
    report(done=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_launcher_main())
