"""Column names shared by the reader, the stages, the writers and the manifest, in one place."""

# Input table and per-row generation parameters (a same-named input column overrides the spec default).
PROMPT = "prompt"
NEGATIVE_PROMPT = "negative_prompt"
SEED = "seed"
HEIGHT = "height"
WIDTH = "width"
PRIOR_STEPS = "prior_steps"  # 0 means diffusers' DEFAULT_STAGE_C_TIMESTEPS (the spec's null)
PRIOR_GUIDANCE = "prior_guidance_scale"
DECODER_STEPS = "decoder_steps"
DECODER_GUIDANCE = "decoder_guidance_scale"

OVERRIDABLE = (
    NEGATIVE_PROMPT,
    SEED,
    HEIGHT,
    WIDTH,
    PRIOR_GUIDANCE,
    DECODER_GUIDANCE,
    PRIOR_STEPS,
    DECODER_STEPS,
)
RESOLUTION = "resolution"  # the sweep axis of [height, width] pairs (report and evaluate show a row's as "HxW")
INT_PARAMS = (SEED, HEIGHT, WIDTH, PRIOR_STEPS, DECODER_STEPS)
FLOAT_PARAMS = (PRIOR_GUIDANCE, DECODER_GUIDANCE)

# Identity of a row and of the models that make it.
ROW_ID = "row_id"
SOURCE_ROW = "source_row"  # "<file>:<index>" of the prompt row, k-th image appended as "#k"
SOURCE_ROW_ID = "source_row_id"  # `decode` only: the row id, in the decoded run, of the row whose Stage C it decodes
IMAGE_INDEX = "image_index"
CHECKPOINT = "checkpoint"  # prior, decoder and dtype: the model identity in the row id
PRIOR_CHECKPOINT = "prior_checkpoint"  # the row's Stage C weights (JSON of a reference or an interpolation)
INPUT_ROWS = "input_rows"  # identical input rows (prompt row × sweep × image) folded into this row, ≥ 1

# Text stage outputs: CLIP last_hidden_state, (77, d) per row; negatives are zeros when unused.
PRIOR_TEXT = "prior_text"
PRIOR_TEXT_NEG = "prior_text_neg"
DECODER_TEXT = "decoder_text"
DECODER_TEXT_NEG = "decoder_text_neg"

# Stage C outputs.
IMAGE_EMBEDDINGS = "image_embeddings"  # (16, h, w), the prior pipeline's output
GENERATOR_STATE = "generator_state"  # the row's CPU torch.Generator state after Stage C (uint8)

# Stage B/A output.
IMAGE = "image"  # (H, W, 3) uint8
IMAGE_FLOAT = "image_float"  # (H, W, 3) float32 in [0, 1] before rounding, on request (parity checks)
IMAGE_FILE = "image_file"  # the image encoded in the output's image_format (bytes), on its way into a shard

# Manifest-only columns.
IMAGE_URI = "image_uri"
ERROR = "error"  # null when the row succeeded
SHARD = "shard"  # output_format webdataset: the tar URI holding the row's sample
KEY = "key"  # … and the sample's key in it (the row id)
TEXT_SECONDS = "text_s"
PRIOR_SECONDS = "prior_s"
DECODER_SECONDS = "decoder_s"
FINISHED_AT = "finished_at"  # unix seconds when the image object was complete
TEXT_NODE = "text_node"  # hex Ray node id that ran each stage for the row ("" outside Ray)
PRIOR_NODE = "prior_node"
DECODER_NODE = "decoder_node"

# Columns too heavy for the manifest: they travel between stages only.
TRANSIENT = (
    PRIOR_TEXT,
    PRIOR_TEXT_NEG,
    DECODER_TEXT,
    DECODER_TEXT_NEG,
    IMAGE_EMBEDDINGS,
    GENERATOR_STATE,
    IMAGE,
    IMAGE_FLOAT,
    IMAGE_FILE,
)

# The prompt table's own columns, packed into one bytes column between reader and writers (stages/user_columns.py).
USER_VALUES = "user_values"

# A stored Stage C row's embedding shape (the embeddings table keeps each embedding flat).
EMBEDDING_SHAPE = "embedding_shape"

# Stage-internal columns that are never the user's own (not carried into the embeddings table).
INTERNAL = TRANSIENT + (EMBEDDING_SHAPE, USER_VALUES)

# Columns the job sets itself: a prompt table holding one is refused (its value would be silently replaced).
RESERVED = (ROW_ID, SOURCE_ROW, SOURCE_ROW_ID, IMAGE_INDEX, CHECKPOINT, PRIOR_CHECKPOINT, INPUT_ROWS, IMAGE_URI,
            ERROR, SHARD, KEY, TEXT_SECONDS, PRIOR_SECONDS, DECODER_SECONDS, FINISHED_AT, TEXT_NODE, PRIOR_NODE,
            DECODER_NODE, *INTERNAL)
