/* heatmap: a picture of a model's routed experts -- how much load each
 * (layer, expert) received and which worker holds it -- as PNG or SVG.
 *
 * The only module that includes cairo.  Two panels side by side, one row per
 * layer (top to bottom), one column per expert (left to right):
 *   left   load: white (none) to dark red (the layer's busiest expert), each
 *          layer scaled to its own maximum; layers without routed experts grey;
 *          the colour scale runs along the bottom
 *   right  placement: each cell split into n_replica vertical stripes coloured
 *          by the holding worker (white = no holder); a legend of the worker
 *          colours runs along the bottom.
 * Size, in pixels (deterministic, so callers and tests can predict it):
 *   cell_w = 12 if n_expert * 12 <= 1200, else max(1, 1200 / n_expert)
 *   cell_h = 12 if n_layer * 12 <= 1200, else max(1, 1200 / n_layer)
 *   width  = 60 + 2 * n_expert * cell_w + 30 + 20
 *   height = 30 + n_layer * cell_h + 40
 * The format follows the file name's extension (.png or .svg, any case). */
#ifndef MOEFLEET_HEATMAP_H
#define MOEFLEET_HEATMAP_H

#include <stdint.h>

struct heatmap_data {
	int n_layer;
	int n_expert;
	const uint8_t *layer_moe; /* [n_layer] */
	const double *load;	  /* [n_layer][n_expert], >= 0 */
	int n_replica;		  /* holder slots per expert; 0 = no placement panel data */
	int n_worker;		  /* for the legend */
	const int32_t *holders;	  /* [n_layer][n_expert][n_replica], -1 = none; may be NULL */
};

/* The picture's size for d (see above). */
void heatmap_size(const struct heatmap_data *d, int *width, int *height);

/* Draws d into path.  ERR_CONFIG for an unknown extension or invalid sizes
 * (n_layer 1..4096, n_expert 1..65536, n_replica 0..64), ERR_IO if the file
 * cannot be written (reason logged). */
int heatmap_write(const char *path, const struct heatmap_data *d);

#endif
