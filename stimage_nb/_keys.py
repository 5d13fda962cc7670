"""Every key this package writes into an AnnData, in one place (cf. squidpy's ``Key``).

Section (input) AnnData
    ``obs[PIXEL_X]``, ``obs[PIXEL_Y]``  centre in full-resolution pixels of the section's image
    ``obs[DIAMETER_UM]``              spot or cell diameter in µm
    ``obsm[SPATIAL]``                 the same centres as an (n, 2) float array, x then y
    ``obsm[CELLTYPE_PROPORTIONS]``    DataFrame of soft cell-type targets (rows sum to 1)
    ``obs[CELLTYPE_LABEL]``           hard per-cell label, when known
    ``X``                             raw integer counts (float32 CSR); zero genes when none
    ``uns[UNS]``                      ``{"section", "patient", "image", "um_per_px", "platform", ...}``
    ``uns[UNS][PLATFORM]``            where the observations come from: ``"st"`` (legacy ST spots), ``"visium"``,
                                      ``"visium_hd"`` (bins), ``"xenium"``/``"cosmx"``/``"merscope"`` (cells),
                                      ``"image"`` (grid points, no transcriptomics), ``"unknown"``
                                      (:mod:`stimage_nb.io.platforms`); the same as ``Section.platform``
    ``uns[UNS][OBS_UNIT]``            what an observation is: ``"spot"``, ``"bin"``, ``"cell"``, ``"pseudospot"``,
                                      ``"grid point"``
    ``obs[N_POINTS]``                 pseudo-spots only: how many cells/bins were summed into it
    ``uns[UNS][PSEUDOSPOT]``          pseudo-spots only: ``{diameter_um, pitch_um, lattice, footprint, source_unit,
                                      n_source, n_used}`` (:mod:`stimage_nb.io.pseudospots`)

Prediction AnnData (``PRED_DIR/<section>.h5ad``)
    ``X``                             predictive mean (expected counts)
    ``layers[ALEATORIC]``             mean over members of the NB variance
    ``layers[EPISTEMIC]``             variance over members of the NB mean
    ``obsm[CELLTYPE_MEAN]``           DataFrame of mean cell-type probabilities
    ``obsm[CELLTYPE_STD]``            DataFrame of their standard deviation across members
    ``obs[DOMAIN_DISTANCE]``          distance of the tile's features from the training data (~1 in distribution)
    ``obs[DOMAIN_PERCENTILE]``        its percentile among held-out reference tiles (:mod:`stimage_nb.domain`)
    ``layers[UNSMOOTHED]``            ``X`` before neighbourhood smoothing (:mod:`stimage_nb.smoothing`), whose
                                      parameters are in ``uns[UNS][UNS_SMOOTHING]``
    ``obsm[SPATIAL]``, ``obs[PIXEL_X]``... as for the section
    ``uns[UNS]``                      provenance: model config, weights sha256, package version, run id,
                                      the section's ``platform``/``obs_unit`` and the model's ``train_platforms``

QuPath / region keys (:mod:`stimage_nb.qupath`)
    ``obs[REGION]``                   name of the pathologist's annotation (region) holding the point
    ``obs[OBJECT_TYPE]``              QuPath object type of an imported point (``detection``/``cell``)
    ``obs[CLASSIFICATION]``           QuPath class name of an imported point ("" when unclassified)
    ``obs[GEOMETRY]``                 GeoJSON geometry (JSON text, full-resolution px) of a cell or detection
    ``obs[NUCLEUS_GEOMETRY]``         GeoJSON nucleus geometry of a cell, when known
    ``obsm[MEASUREMENTS]``            DataFrame of QuPath measurements that are not predictions
    ``uns[UNS][CLASS_COLOURS]``       ``{class: [r, g, b]}`` so re-exports keep the pathologist's colours
    ``uns[UNS][REGIONS]``             the annotations (name, class, colour, GeoJSON geometry)
"""

from __future__ import annotations

UNS = "stimage_nb"
SPATIAL = "spatial"
PIXEL_X = "pixel_x"
PIXEL_Y = "pixel_y"
DIAMETER_UM = "diameter_um"
IN_IMAGE = "in_image"
CELLTYPE_PROPORTIONS = "celltype_proportions"
CELLTYPE_LABEL = "celltype"
REGION = "region"
PLATFORM = "platform"
OBS_UNIT = "obs_unit"
N_POINTS = "n_points"
PSEUDOSPOT = "pseudospot"

ALEATORIC = "aleatoric_var"
EPISTEMIC = "epistemic_var"
CELLTYPE_MEAN = "celltype_mean"
CELLTYPE_STD = "celltype_std"
CELLTYPE_PRED = "celltype_pred"
DOMAIN_DISTANCE = "domain_distance"
DOMAIN_PERCENTILE = "domain_percentile"
UNSMOOTHED = "unsmoothed_mean"            # layers: X before stimage_nb.smoothing.smooth_prediction
UNS_SMOOTHING = "smoothing"               # uns[UNS][...]: the smoothing's parameters

OBJECT_TYPE = "object_type"
CLASSIFICATION = "classification"
GEOMETRY = "geometry"
NUCLEUS_GEOMETRY = "nucleus_geometry"
MEASUREMENTS = "qupath_measurements"
CLASS_COLOURS = "class_colours"
REGIONS = "regions"
