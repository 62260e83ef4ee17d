#include "heatmap.h"
#include "../../common/err.h"
#include "../../common/log.h"

#include <cairo.h>
#include <cairo-svg.h>
#include <fontconfig/fontconfig.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

enum {
	HM_LEFT = 60,
	HM_TOP = 30,
	HM_GAP = 30,
	HM_RIGHT = 20,
	HM_BOTTOM = 40,
	HM_CELL = 12,
	HM_SPAN = 1200
};

static int heatmap_cell(int n)
{
	if (n * HM_CELL <= HM_SPAN)
		return HM_CELL;
	int c = HM_SPAN / n;
	return c < 1 ? 1 : c;
}

void heatmap_size(const struct heatmap_data *d, int *width, int *height)
{
	*width = HM_LEFT + 2 * d->n_expert * heatmap_cell(d->n_expert) + HM_GAP + HM_RIGHT;
	*height = HM_TOP + d->n_layer * heatmap_cell(d->n_layer) + HM_BOTTOM;
}

/* A distinct colour per worker: hues spread by the golden angle. */
static void heatmap_worker_rgb(int w, double rgb[3])
{
	double h = fmod(w * 137.508, 360.0) / 60.0, s = 0.65, v = w % 2 ? 0.80 : 0.95;
	double c = v * s, x = c * (1 - fabs(fmod(h, 2.0) - 1)), m = v - c;
	double r = 0, g = 0, b = 0;
	switch ((int)h) {
	case 0: r = c, g = x; break;
	case 1: r = x, g = c; break;
	case 2: g = c, b = x; break;
	case 3: g = x, b = c; break;
	case 4: r = x, b = c; break;
	default: r = c, b = x; break;
	}
	rgb[0] = r + m;
	rgb[1] = g + m;
	rgb[2] = b + m;
}

static void heatmap_text(cairo_t *cr, double x, double y, const char *s)
{
	cairo_set_source_rgb(cr, 0, 0, 0);
	cairo_move_to(cr, x, y);
	cairo_show_text(cr, s);
}

static void heatmap_draw(cairo_t *cr, const struct heatmap_data *d, int width, int height)
{
	const int cw = heatmap_cell(d->n_expert), ch = heatmap_cell(d->n_layer);
	const double x_load = HM_LEFT, x_place = HM_LEFT + d->n_expert * cw + HM_GAP;
	cairo_set_source_rgb(cr, 1, 1, 1);
	cairo_paint(cr);
	cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
	cairo_set_font_size(cr, 11);
	heatmap_text(cr, x_load, 18, "load per (layer, expert)");
	heatmap_text(cr, x_place, 18, "placement: worker per replica");
	for (int l = 0; l < d->n_layer; l++) {
		double y = HM_TOP + (double)l * ch;
		if (ch >= 8 && (l % (ch >= 12 ? 1 : 4)) == 0) {
			char lab[16];
			snprintf(lab, sizeof(lab), "%d", l);
			heatmap_text(cr, 8, y + ch - 2, lab);
		}
		double max = 0;
		for (int e = 0; e < d->n_expert; e++)
			max = fmax(max, d->load[(size_t)l * d->n_expert + e]);
		for (int e = 0; e < d->n_expert; e++) {
			double f = max > 0 ? d->load[(size_t)l * d->n_expert + e] / max : 0;
			if (!d->layer_moe[l])
				cairo_set_source_rgb(cr, 0.85, 0.85, 0.85);
			else
				cairo_set_source_rgb(cr, 1.0 - 0.45 * f, 1.0 - 0.95 * f,
						     1.0 - 0.95 * f);
			cairo_rectangle(cr, x_load + (double)e * cw, y, cw, ch);
			cairo_fill(cr);
			int R = d->n_replica;
			for (int r = 0; r < R && d->holders; r++) {
				int32_t w = d->holders[((size_t)l * d->n_expert + e) * R + r];
				double rgb[3] = {1, 1, 1};
				if (!d->layer_moe[l])
					rgb[0] = rgb[1] = rgb[2] = 0.85;
				else if (w >= 0)
					heatmap_worker_rgb(w, rgb);
				cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
				cairo_rectangle(cr, x_place + (double)e * cw + (double)r * cw / R,
						y, (double)cw / R, ch);
				cairo_fill(cr);
			}
		}
	}
	/* frames */
	cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
	cairo_set_line_width(cr, 1);
	cairo_rectangle(cr, x_load - 0.5, HM_TOP - 0.5, d->n_expert * cw + 1, d->n_layer * ch + 1);
	cairo_rectangle(cr, x_place - 0.5, HM_TOP - 0.5, d->n_expert * cw + 1, d->n_layer * ch + 1);
	cairo_stroke(cr);
	/* legend; below it the load colour scale, 0 to the layer's busiest expert */
	double y = height - HM_BOTTOM + 14, x = x_place;
	heatmap_text(cr, x_load, y + 9, "layer down, expert across");
	cairo_pattern_t *scale = cairo_pattern_create_linear(x_load, 0, x_load + 80, 0);
	cairo_pattern_add_color_stop_rgb(scale, 0, 1, 1, 1);
	cairo_pattern_add_color_stop_rgb(scale, 1, 0.55, 0.05, 0.05);
	cairo_set_source(cr, scale);
	cairo_rectangle(cr, x_load, y + 14, 80, 10);
	cairo_fill(cr);
	cairo_pattern_destroy(scale);
	heatmap_text(cr, x_load - 12, y + 23, "0");
	heatmap_text(cr, x_load + 84, y + 23, "layer max");
	for (int w = 0; w < d->n_worker && x + 40 < width; w++) {
		double rgb[3];
		heatmap_worker_rgb(w, rgb);
		cairo_set_source_rgb(cr, rgb[0], rgb[1], rgb[2]);
		cairo_rectangle(cr, x, y, 10, 10);
		cairo_fill(cr);
		char lab[16];
		snprintf(lab, sizeof(lab), "w%d", w);
		heatmap_text(cr, x + 13, y + 9, lab);
		x += 40;
	}
}

int heatmap_write(const char *path, const struct heatmap_data *d)
{
	if (d->n_layer < 1 || d->n_layer > 4096 || d->n_expert < 1 || d->n_expert > 65536 ||
	    d->n_replica < 0 || d->n_replica > 64 || d->n_worker < 0 || !d->load || !d->layer_moe) {
		log_error("%s: nothing to draw (%d layers x %d experts)", path, d->n_layer,
			  d->n_expert);
		return ERR_CONFIG;
	}
	const char *dot = strrchr(path, '.');
	int png = dot && !strcasecmp(dot, ".png"), svg = dot && !strcasecmp(dot, ".svg");
	if (!png && !svg) {
		log_error("%s: unknown picture format (use .png or .svg)", path);
		return ERR_CONFIG;
	}
	int width, height;
	heatmap_size(d, &width, &height);
	cairo_surface_t *sf = png ? cairo_image_surface_create(CAIRO_FORMAT_RGB24, width, height)
				  : cairo_svg_surface_create(path, width, height);
	if (cairo_surface_status(sf) != CAIRO_STATUS_SUCCESS) {
		log_error("%s: cannot create the picture: %s", path,
			  cairo_status_to_string(cairo_surface_status(sf)));
		cairo_surface_destroy(sf);
		return ERR_IO;
	}
	cairo_t *cr = cairo_create(sf);
	heatmap_draw(cr, d, width, height);
	cairo_status_t st = cairo_status(cr);
	cairo_destroy(cr);
	if (st == CAIRO_STATUS_SUCCESS && png)
		st = cairo_surface_write_to_png(sf, path);
	cairo_surface_finish(sf);
	if (st == CAIRO_STATUS_SUCCESS)
		st = cairo_surface_status(sf);
	cairo_surface_destroy(sf);
	/* drop cairo's and fontconfig's font caches: nothing else in the process draws */
	cairo_debug_reset_static_data();
	FcFini();
	if (st != CAIRO_STATUS_SUCCESS) {
		log_error("%s: cannot write: %s", path, cairo_status_to_string(st));
		return ERR_IO;
	}
	return 0;
}
