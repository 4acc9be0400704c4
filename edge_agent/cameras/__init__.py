"""Where the frame comes from: capture threads (one per camera), the freshest frame and its age,
the camera set by name, images made safe for the model (checked, decoded, downscaled,
re-encoded), motion, and OpenCV's process-wide settings (opencv_env). The only package that
imports cv2. It imports only errors, log, backoff and settings of this package; never work/,
daemon/, mqtt/, delivery/ or inference/: those ask it for frames."""
