"""A real Bluesky energy x angle tomography scan with ophyd's simulated devices, written to Tiled by TiledWriter.

The detector is ``ophyd.sim.SynSignalWithRegistry`` (it writes each frame to a
``.npy`` file and emits Resource/Datum documents, which TiledWriter registers as
external arrays); the monochromator and rotation stage are ``ophyd.sim.SynAxis``
(energy in keV). The frames are those of a :func:`gpureg.simulate` scan, so the
result can be compared with the pipeline on the same data. Streams: ``dark``
(once, first), then per energy ``flat`` and ``primary`` (the projections). The start
document records the plan as NSLS-II FXI's scan plans do: ``num_angles`` (projections
per energy), ``num_bkg_images`` (open-beam frames per energy), ``num_dark_images``.
"""

def scan_arrays(path, *, energies, n_angles, size, seed=7):
    """Simulate the scan into ``path`` (Data Exchange) and return its arrays."""
    import h5py

    import gpureg

    gpureg.simulate(path, size=size, energies=energies, n_angles=n_angles, seed=seed)
    with h5py.File(path, "r") as h5:
        return {k: h5["exchange"][k][()] for k in ("data", "data_white", "data_dark", "theta", "energy")}


def devices(frames_dir):
    """``(mono, rot, cams, holder)``: each camera (``cams["primary"|"flat"|"dark"]``, one per stream: a registry
    signal's files belong to one stream) reads whatever frame the plan puts in ``holder["frame"]``."""
    from ophyd.sim import SynAxis, SynSignalWithRegistry

    holder = {"frame": None}
    mono, rot = SynAxis(name="mono_energy"), SynAxis(name="rot_angle")
    cams = {s: SynSignalWithRegistry(name=n, func=lambda: holder["frame"], save_path=str(frames_dir))
            for s, n in (("primary", "cam_image"), ("flat", "cam_flat_image"), ("dark", "cam_dark_image"))}
    return mono, rot, cams, holder


def tomo_plan(a, mono, rot, cams, holder, *, before_energy=None, md=None, record_plan=True):
    """Darks, then for each energy: flats and one projection per angle. ``before_energy(k)`` runs (plain Python,
    between documents) before energy ``k`` starts. ``record_plan=False`` leaves the frame counts out of the start
    document."""
    import bluesky.plan_stubs as bps

    plan = {"num_angles": len(a["theta"]), "num_bkg_images": int(a["data_white"].shape[1]),
            "num_dark_images": len(a["data_dark"])} if record_plan else {}
    yield from bps.open_run(md={"plan_name": "gpureg_test_xanes_tomo", **plan, **(md or {})})
    for cam in cams.values():
        yield from bps.stage(cam)
    yield from bps.mv(mono, float(a["energy"][0]) / 1000.0)
    for f in a["data_dark"]:
        holder["frame"] = f
        yield from bps.trigger_and_read([cams["dark"], mono], name="dark")
    for k, e in enumerate(a["energy"]):
        if before_energy is not None:
            before_energy(k)
        yield from bps.mv(mono, float(e) / 1000.0)
        for f in a["data_white"][k]:
            holder["frame"] = f
            yield from bps.trigger_and_read([cams["flat"], mono], name="flat")
        for j, th in enumerate(a["theta"]):
            yield from bps.mv(rot, float(th))
            holder["frame"] = a["data"][k, j]
            yield from bps.trigger_and_read([cams["primary"], mono, rot])
    for cam in cams.values():
        yield from bps.unstage(cam)
    yield from bps.close_run()


def run_scan(client, a, frames_dir, *, on_start=None, before_energy=None, record_plan=True, after_write=None):
    """Run the scan with a RunEngine writing to ``client`` through TiledWriter; returns the run's uid.

    ``on_start(uid)`` is called when the start document is out (e.g. to launch a watcher on the run);
    ``after_write(name, doc)`` gets every document once TiledWriter has written it.
    """
    from bluesky import RunEngine
    from bluesky.callbacks.tiled_writer import TiledWriter

    mono, rot, cams, holder = devices(frames_dir)
    engine = RunEngine({}, call_returns_result=False)
    engine.subscribe(TiledWriter(client, batch_size=1))
    if after_write is not None:  # subscribers are called in order: TiledWriter's write is done by then
        engine.subscribe(after_write)
    if on_start is not None:
        engine.subscribe(lambda name, doc: on_start(doc["uid"]), "start")
    (uid,) = engine(tomo_plan(a, mono, rot, cams, holder, before_energy=before_energy, record_plan=record_plan))
    return uid
