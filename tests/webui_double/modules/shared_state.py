"""Job state; mirrors modules/shared_state.py (State)."""
import datetime
import time


class State:  # mirrors modules/shared_state.py (State)
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = '0'
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None

    def __init__(self):
        self.server_start = time.time()

    def skip(self):  # mirrors modules/shared_state.py (State.skip)
        self.skipped = True

    def interrupt(self):  # mirrors modules/shared_state.py (State.interrupt)
        self.interrupted = True

    def stop_generating(self):  # mirrors modules/shared_state.py (State.stop_generating)
        self.stopping_generation = True

    def nextjob(self):  # mirrors modules/shared_state.py (State.nextjob)
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def begin(self, job: str = "(unknown)"):  # mirrors modules/shared_state.py (State.begin): called by the UI/API wrappers, not by process_images
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    def end(self):  # mirrors modules/shared_state.py (State.end)
        self.job = ""
        self.job_count = 0

    def set_current_image(self):  # mirrors modules/shared_state.py (State.set_current_image); no previews in the double
        pass

    def assign_current_image(self, image):  # mirrors modules/shared_state.py (State.assign_current_image)
        self.current_image = image
        self.id_live_preview += 1
