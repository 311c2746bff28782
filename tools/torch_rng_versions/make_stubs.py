"""Stand-ins for the CUDA libraries a CUDA torch wheel links: right SONAME, version nodes and symbol names.

Every function is an empty stub; the CPU code paths measured never call them.
"""
import collections, glob, os, re, subprocess, sys
libdir, outdir = sys.argv[1], sys.argv[2]
os.makedirs(outdir, exist_ok=True)
known = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
libs = [p for p in glob.glob(os.path.join(libdir, "*.so*")) if os.path.isfile(p)]
libs += glob.glob(os.path.join(os.path.dirname(libdir), "_C*.so"))
missing, defined, undefined = set(), set(), collections.defaultdict(set)
for path in libs:
    missing.update(re.findall(r"\s(\S+) => not found", subprocess.run(["ldd", path], capture_output=True, text=True).stdout))
    for line in subprocess.run(["nm", "-D", "--with-symbol-versions", path], capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("U", "w"):
            name, _, version = parts[1].partition("@")
            undefined[version.lstrip("@")].add(name)
        elif len(parts) == 3:
            defined.add(parts[2].partition("@")[0])
system = set()
for lib in ["libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libdl.so.2", "libpthread.so.0", "librt.so.1"]:
    m = re.search(rf"{re.escape(lib)} \(.*?\) => (\S+)", known)
    if m:
        for line in subprocess.run(["nm", "-D", m.group(1)], capture_output=True, text=True).stdout.splitlines():
            parts = line.split()
            if len(parts) == 3:
                system.add(parts[2].partition("@")[0])
unversioned = sorted(n for n in undefined.get("", ()) if n not in defined and n not in system)
for lib in sorted(missing):
    versions = {v: sorted(undefined[v]) for v in undefined if v == lib or (lib.startswith("libnvshmem") and v == "NVSHMEM")}
    symbols = sorted({s for names in versions.values() for s in names} | set(unversioned))
    src = os.path.join(outdir, lib + ".c")
    open(src, "w").write("".join(f"void {s}(void) {{}}\n" for s in symbols) or "int cudastub_placeholder;\n")
    vmap = os.path.join(outdir, lib + ".map")
    nodes = [f"{v} {{ global: {' '.join(s + ';' for s in names)} }};\n" for v, names in versions.items()]
    open(vmap, "w").write("".join(nodes) or "STUB { global: *; };\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", os.path.join(outdir, lib), src,
                    f"-Wl,-soname,{lib}", f"-Wl,--version-script={vmap}"], check=True)
    print("stub", lib, {v: len(n) for v, n in versions.items()}, "unversioned", len(unversioned))
